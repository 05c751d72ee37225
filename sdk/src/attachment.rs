//! Attachments: the payload convention, the upload thread
//! (`tern-sdk-upload`) and verified downloads. The only user of `ureq`.
//!
//! The convention (docs/sdk.md, shared with the JS client): a message of
//! TYPE 1 ([`crate::TYPE_ATTACHMENT`]) whose payload is the UTF-8 JSON
//!
//! ```json
//! {"tern":"attachment","url":"/v1/files/…?exp=…&sig=…","id":"…","name":"report.pdf",
//!  "size":52428800,"mime":"application/pdf","sha256":"<64 hex>","caption":"Q3"}
//! ```
//!
//! `url` is the signed, time-limited path the server's upload answered
//! (relative to the HTTP base); `id` lets a client with a token fetch
//! `/v1/files/{id}` after the signature has expired. `caption` may be absent
//! or null. Unknown fields are ignored.
//!
//! Sending: [`crate::Tern::send_file`] commits the message as UPLOADING
//! with the file's path (nothing is read yet). This thread uploads it
//! (streamed, hashed on the way), then commits the payload and OUTBOX in
//! one transaction. An upload cut off by a crash is started again from the
//! beginning after the restart, for the same message and id; the server
//! throws the partial upload away.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backoff::Backoff;
use crate::conn::{Ctl, Shared};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::store::Upload;
use crate::types::{Message, TYPE_ATTACHMENT};

/// The `tern` field's value that marks an attachment payload.
pub const MARK: &str = "attachment";

/// Progress events at most this often, in bytes.
const PROGRESS_STEP: u64 = 1 << 20;

/// An attachment message's payload (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Always `"attachment"`.
    pub tern: String,
    /// Signed download path (relative to the HTTP base) or absolute URL.
    pub url: String,
    /// The file's id on the server (`/v1/files/{id}`).
    pub id: String,
    /// The file name the sender gave (untrusted: never used as a path as is).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// MIME type.
    pub mime: String,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
    /// Optional caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
}

impl Attachment {
    /// The attachment a message carries, if it is one.
    pub fn from_message(m: &Message) -> Option<Attachment> {
        if m.msg_type != TYPE_ATTACHMENT {
            return None;
        }
        let a: Attachment = serde_json::from_slice(&m.payload).ok()?;
        (a.tern == MARK).then_some(a)
    }

    /// The payload bytes.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether the fields that end up in paths and URLs are safe: a
    /// 64-hex sha256 and an id of `[A-Za-z0-9_-]`.
    fn is_well_formed(&self) -> bool {
        self.sha256.len() == 64
            && self.sha256.bytes().all(|b| b.is_ascii_hexdigit())
            && !self.id.is_empty()
            && self.id.len() <= 128
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

/// A MIME type from a file name's extension.
pub fn guess_mime(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "md" => "text/plain",
        "html" | "htm" => "text/html",
        "csv" => "text/csv",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => "application/octet-stream",
    }
}

/// A file name safe to create in the cache: the last path component of
/// `name`, without control characters or leading dots; "file" if nothing
/// is left.
fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim_start_matches('.')
        .chars()
        .take(200)
        .collect();
    if cleaned.is_empty() {
        "file".into()
    } else {
        cleaned
    }
}

/// Why an upload attempt failed.
enum UploadError {
    /// Try again later.
    Transient(String),
    /// Never: the message ends in this status.
    Permanent(crate::types::Status, String),
}

/// Starts the upload thread.
pub(crate) fn spawn_uploader(
    shared: Arc<Shared>,
    ctl: Receiver<Ctl>,
    conn: Sender<Ctl>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("tern-sdk-upload".into())
        .spawn(move || uploader(shared, ctl, conn))
}

fn uploader(shared: Arc<Shared>, ctl: Receiver<Ctl>, conn: Sender<Ctl>) {
    // Parts of downloads that a crash or a kill cut off.
    if let Ok(dirs) = fs::read_dir(shared.config.cache_dir_or_default()) {
        let age = stale_part_age(&shared.config);
        for d in dirs.flatten() {
            remove_stale_parts(&d.path(), age);
        }
    }
    let mut backoff = Backoff::new(shared.config.reconnect_min, shared.config.reconnect_max);
    let mut after = 0;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        // Nothing goes up until a login has shown the token to be this
        // store's user's (the connection thread then wakes this thread).
        let job = match shared.verified.load(Ordering::Acquire) {
            false => None,
            true => shared.store.next_upload(after).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "upload: store");
                None
            }),
        };
        let Some(job) = job else {
            // Nothing (more) to do, or not yet: wait for send_file or the
            // login.
            after = 0;
            match ctl.recv() {
                Ok(Ctl::Shutdown) | Err(_) => return,
                Ok(_) => continue,
            }
        };
        let lid = job.lid;
        let result = upload(&shared, &job);
        let uploaded = result.is_ok();
        let outcome = match result {
            Ok(payload) => shared.store.finish_upload(lid, &payload),
            Err(UploadError::Permanent(status, why)) => {
                tracing::warn!(lid, %why, "upload failed for good");
                shared.store.fail_upload(lid, status)
            }
            Err(UploadError::Transient(why)) => {
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::debug!(lid, %why, ?delay, "upload failed; will retry");
                after = 0;
                match ctl.recv_timeout(delay) {
                    Ok(Ctl::Shutdown) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        return
                    }
                    _ => continue,
                }
            }
        };
        backoff.reset();
        after = lid;
        match outcome {
            Ok(Some(event)) => shared.emitter.emit(event),
            Ok(None) => {}
            Err(e) => tracing::warn!(lid, error = %e, "upload: store"),
        }
        let _ = conn.send(match uploaded {
            true => Ctl::Ready(lid),
            false => Ctl::Wake,
        });
    }
}

/// Reads a file, hashing it and reporting progress; fails once the SDK
/// is stopping so that shutdown does not wait for a large upload.
struct Hashing<'a> {
    /// The file.
    inner: File,
    /// SHA-256 of what was read.
    hash: Sha256,
    /// Bytes read.
    read: u64,
    /// The file's size.
    total: u64,
    /// Bytes read when progress was last reported.
    reported: u64,
    /// The message's local id (for progress events).
    lid: i64,
    /// For the stop flag and the emitter.
    shared: &'a Shared,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(io::Error::other("the SDK is shutting down"));
        }
        // Never more than the size announced in Content-Length.
        let left = self.total - self.read;
        let cap = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..cap])?;
        self.hash.update(&buf[..n]);
        self.read += n as u64;
        if self.read - self.reported >= PROGRESS_STEP || (n > 0 && self.read == self.total) {
            self.reported = self.read;
            self.shared.emitter.emit(Event::Upload {
                lid: self.lid,
                sent: self.read,
                total: self.total,
            });
        }
        Ok(n)
    }
}

/// The upload answer fields the SDK uses.
#[derive(Deserialize)]
struct Uploaded {
    id: String,
    url: String,
    size: u64,
    sha256: String,
}

/// One attempt: POST the file, check the answer, build the payload.
fn upload(shared: &Shared, job: &Upload) -> Result<Vec<u8>, UploadError> {
    let Some(base) = &shared.config.http else {
        return Err(UploadError::Transient("no HTTP URL configured".into()));
    };
    let file = File::open(&job.path).map_err(|e| {
        UploadError::Permanent(
            crate::types::Status::UploadFailed,
            format!("{}: {e}", job.path.display()),
        )
    })?;
    let total = file
        .metadata()
        .map_err(|e| UploadError::Transient(e.to_string()))?
        .len();
    let mut body = Hashing {
        inner: file,
        hash: Sha256::new(),
        read: 0,
        total,
        reported: 0,
        lid: job.lid,
        shared,
    };
    let answer = agent(&shared.config)
        .post(&format!("{base}/v1/files"))
        .set("Authorization", &format!("Bearer {}", shared.config.token))
        .set("Content-Type", &job.mime)
        .set("Content-Length", &total.to_string())
        .send(&mut body);
    let answer = match answer {
        Ok(a) => a,
        Err(ureq::Error::Status(413, _)) => {
            return Err(UploadError::Permanent(
                crate::types::Status::Failed(tern::wire::StatusCode::TOO_LARGE),
                "413".into(),
            ))
        }
        Err(ureq::Error::Status(code @ (400 | 401 | 403 | 411 | 415), r)) => {
            return Err(UploadError::Permanent(
                crate::types::Status::UploadFailed,
                format!("{code}: {}", r.into_string().unwrap_or_default()),
            ))
        }
        Err(e) => return Err(UploadError::Transient(e.to_string())),
    };
    let up: Uploaded = serde_json::from_reader(answer.into_reader().take(MAX_ANSWER))
        .map_err(|e| UploadError::Transient(format!("upload answer: {e}")))?;
    let sha256 = hex::encode(body.hash.finalize());
    if body.read != total || up.size != total || !up.sha256.eq_ignore_ascii_case(&sha256) {
        return Err(UploadError::Transient(format!(
            "the server stored {} bytes with sha256 {}; sent {} of {total} with {sha256}",
            up.size, up.sha256, body.read
        )));
    }
    let attachment = Attachment {
        tern: MARK.into(),
        url: up.url,
        id: up.id,
        name: job.name.clone(),
        size: total,
        mime: job.mime.clone(),
        sha256,
        caption: job.caption.clone(),
    };
    Ok(attachment.to_payload())
}

/// What `send_file` records about a file before anything is read.
pub(crate) fn prepare(path: &Path, caption: Option<&str>) -> Result<Upload> {
    let path = fs::canonicalize(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = fs::metadata(&path).map_err(|source| Error::File {
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(Error::Invalid(format!("{} is not a file", path.display())));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    Ok(Upload {
        lid: 0,
        mime: guess_mime(&name).into(),
        name,
        path,
        caption: caption.map(str::to_owned),
    })
}

/// Downloads `m`'s attachment into `cache` (or finds it there), verified
/// against its sha256 and size; returns the file's path,
/// `<cache>/<sha256>/<name>`.
pub(crate) fn download(shared: &Shared, m: &Message) -> Result<PathBuf> {
    let a = m.attachment().ok_or(Error::NotAttachment)?;
    if !a.is_well_formed() {
        return Err(Error::Invalid("malformed attachment payload".into()));
    }
    let base = shared.config.http.as_deref().ok_or(Error::NoHttp)?;
    if !shared.verified.load(Ordering::Acquire) {
        // The token may be another user's (`ConnectionState::WrongUser`).
        return Err(Error::Offline);
    }
    let dir = shared
        .config
        .cache_dir_or_default()
        .join(a.sha256.to_ascii_lowercase());
    let target = dir.join(safe_name(&a.name));
    let in_file = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::File { path, source }
    };
    if let Ok(f) = File::open(&target) {
        let (got, size) = hash_stream(f, io::sink()).map_err(in_file(&target))?;
        if got.eq_ignore_ascii_case(&a.sha256) && size == a.size {
            return Ok(target);
        }
        fs::remove_file(&target).map_err(in_file(&target))?;
    }
    fs::create_dir_all(&dir).map_err(in_file(&dir))?;
    remove_stale_parts(&dir, stale_part_age(&shared.config));
    let part = dir.join(format!(".part-{:016x}", rand::random::<u64>()));
    let answer = agent(&shared.config)
        .get(&format!("{base}/v1/files/{}", a.id))
        .set("Authorization", &format!("Bearer {}", shared.config.token))
        .call()
        .map_err(|e| Error::Http(e.to_string()))?;
    let result = (|| {
        let out = File::create(&part).map_err(in_file(&part))?;
        // One byte past the size: a longer body is corrupt, not a disk filler.
        let body = answer.into_reader().take(a.size.saturating_add(1));
        let (got, size) =
            hash_stream(body, out).map_err(|e| Error::Http(format!("download: {e}")))?;
        if !got.eq_ignore_ascii_case(&a.sha256) || size != a.size {
            return Err(Error::Corrupt {
                expected: a.sha256.clone(),
                size: a.size,
                got,
                got_size: size,
            });
        }
        fs::rename(&part, &target).map_err(in_file(&target))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&part);
    }
    result.map(|()| target)
}

/// How long a download's part may go unwritten before it counts as left
/// behind: an hour, or twice `http_timeout` if longer (a live download
/// writes at least about every `http_timeout`, or fails and removes its
/// part).
fn stale_part_age(config: &crate::Config) -> Duration {
    config
        .http_timeout
        .saturating_mul(2)
        .max(Duration::from_secs(3600))
}

/// Removes the `.part-` files in `dir` not written for `age`: downloads a
/// crash cut off (one that fails removes its own). Cache directories may
/// be shared by instances, so a part still being written stays.
fn remove_stale_parts(dir: &Path, age: Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().as_encoded_bytes().starts_with(b".part-") {
            continue;
        }
        // The file's own times (a directory listing's may lag on Windows);
        // a link is judged, and removed, as a link.
        let idle = fs::symlink_metadata(e.path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if idle.is_some_and(|idle| idle >= age) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Bytes of the upload's JSON answer read at most.
const MAX_ANSWER: u64 = 64 * 1024;

/// An HTTP agent with the configured timeouts.
fn agent(config: &crate::Config) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(config.connect_timeout)
        .timeout_read(config.http_timeout)
        .timeout_write(config.http_timeout)
        .build()
}

/// Copies `from` into `to`; returns the sha256 (hex) and length.
fn hash_stream(mut from: impl Read, mut to: impl Write) -> io::Result<(String, u64)> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        len += n as u64;
    }
    to.flush()?;
    Ok((hex::encode(hash.finalize()), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_left_behind_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".part-00000000000000aa");
        let live = dir.path().join(".part-00000000000000bb");
        let file = dir.path().join("photo.jpg");
        for p in [&old, &live, &file] {
            fs::write(p, b"x").unwrap();
        }
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for p in [&old, &file] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        remove_stale_parts(dir.path(), Duration::from_secs(600));
        assert!(!old.exists(), "a part an hour old is left behind");
        assert!(live.exists(), "a part being written was removed");
        assert!(file.exists(), "a downloaded file was removed");
    }

    #[test]
    fn payload_round_trip_and_foreign_json_is_not_an_attachment() {
        let a = Attachment {
            tern: MARK.into(),
            url: "/v1/files/abc?exp=1&sig=2".into(),
            id: "abc".into(),
            name: "r.pdf".into(),
            size: 3,
            mime: "application/pdf".into(),
            sha256: "0".repeat(64),
            caption: None,
        };
        let payload = a.to_payload();
        let text = String::from_utf8(payload.clone()).unwrap();
        assert!(text.starts_with(r#"{"tern":"attachment","url":"#), "{text}");
        assert!(!text.contains("caption"), "{text}");
        let mut m = Message {
            lid: 1,
            direction: crate::Direction::Incoming,
            peer: crate::Peer::user("a"),
            sender: Some("a".into()),
            id: 1,
            seq: Some(1),
            msg_type: TYPE_ATTACHMENT,
            priority: 0,
            expiry: None,
            flags: 0,
            time: 0,
            payload,
            status: crate::Status::Received,
            status_time: 0,
        };
        assert_eq!(Attachment::from_message(&m), Some(a));
        // With a caption (the JS client may send null).
        m.payload = br#"{"tern":"attachment","url":"u","id":"i","name":"n","size":1,
            "mime":"m","sha256":"s","caption":null,"extra":1}"#
            .to_vec();
        assert!(Attachment::from_message(&m).is_some());
        m.payload =
            br#"{"tern":"other","url":"u","id":"i","name":"n","size":1,"mime":"m","sha256":"s"}"#
                .to_vec();
        assert!(Attachment::from_message(&m).is_none());
        m.msg_type = 0;
        m.payload = a_payload();
        assert!(Attachment::from_message(&m).is_none(), "TYPE 0 is text");
    }

    fn a_payload() -> Vec<u8> {
        br#"{"tern":"attachment","url":"u","id":"i","name":"n","size":1,"mime":"m","sha256":"s"}"#
            .to_vec()
    }

    #[test]
    fn names_from_senders_cannot_escape_the_cache() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\x.exe"), "x.exe");
        assert_eq!(safe_name(".."), "file");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name("a\nb.txt"), "ab.txt");
        assert_eq!(safe_name("photo.JPG"), "photo.JPG");
        assert_eq!(guess_mime("photo.JPG"), "image/jpeg");
        assert_eq!(guess_mime("noext"), "application/octet-stream");
    }
}
