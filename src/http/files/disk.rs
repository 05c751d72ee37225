//! The file catalog in `<data_dir>/files/`: metadata, direct uploads in
//! progress and the byte count behind `max_files_bytes`, for both
//! backends; the bytes themselves go through [`Blobs`].
//!
//! ```text
//! <data_dir>/files/<id>.json          metadata (Meta); its presence is the commit point
//! <data_dir>/files/<id>               the bytes, exactly as uploaded   (local backend)
//! <data_dir>/files/<id>.thumb         the thumbnail, JPEG              (local backend)
//! <data_dir>/files/tmp/<r>.part       uploads, metadata, thumbnail sources being written
//! <data_dir>/files/pending/<id>.json  direct uploads announced, not completed (s3)
//! ```
//!
//! With the s3 backend, `<id>` and `<id>.thumb` are objects of the bucket,
//! and so is `<id>.upload`, where a direct upload's presigned URL puts the
//! bytes: completion copies them to `<id>` and checks the copy, so the URL,
//! good until it expires, can neither change a completed file nor bring
//! back a deleted one.
//! `<id>` is 32 lowercase hex characters (128 random bits) made here, and
//! `<r>` likewise: no path or key ever holds client-supplied text, and
//! [`is_id`] gates every id that comes from a URL before any path is built
//! from it.
//!
//! An upload streams into its object while hashing and counting; the object
//! is committed (local: fsync'd, renamed to `<id>`, the directory fsync'd;
//! s3: the multipart upload completed), then the thumbnail, then the
//! metadata goes through the same steps to `<id>.json`. A crash before the
//! metadata rename leaves an orphan (removed at the next start, or by the
//! sweep for objects) and no answer to the client. A delete removes
//! `<id>.json` first, then the bytes.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::blobs::{create_dir_durable, sync_dir, BlobError, Blobs, Part};
use super::s3::StoreDown;
use super::thumb;
use crate::metrics::Metrics;
use crate::store::Store;

/// Bytes read from the request and written to the store per step.
const CHUNK: usize = 64 * 1024;
/// Largest metadata file read; real ones are a few hundred bytes.
const MAX_META: u64 = 64 * 1024;
/// Length of an id: hex of 128 bits.
const ID_LEN: usize = 32;
/// Age after which a partial file in `tmp/`, or an object without metadata,
/// is an abandoned upload (a live upload writes every few seconds, and an
/// object gets its metadata right after it is complete).
pub const ABANDONED_AFTER_MS: u64 = 3_600_000;

/// Whether `s` is an id as this store makes them: exactly 32 lowercase hex
/// characters. Anything else (`..`, `/`, `%2e`, NUL, …) is refused before a
/// path is formed.
pub fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random id.
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; ID_LEN / 2]>())
}

/// The key of a file's thumbnail.
pub fn thumb_key(id: &str) -> String {
    format!("{id}.thumb")
}

/// Who uploaded a file. Serialized as `"admin"` or `{"user": "<address>"}`,
/// so that a user who happens to be called `admin` owns nothing of the
/// admin's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Uploader {
    /// Uploaded with the admin token.
    Admin,
    /// Uploaded with this user's token.
    User(String),
}

/// The contents of `<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Length of the file, bytes.
    pub size: u64,
    /// SHA-256 of the bytes, lowercase hex; also the ETag.
    pub sha256: String,
    /// The upload's `Content-Type`, served back as is.
    pub content_type: String,
    /// Who may delete it (with the admin).
    pub uploader: Uploader,
    /// When the upload completed, unix ms.
    pub created_ms: u64,
    /// The thumbnail's size in bytes, when the file has one (`<id>.thumb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<u64>,
}

/// The contents of `pending/<id>.json`: a direct upload announced by
/// `POST /v1/files` and not yet completed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    /// The size the presigned URL allows, bytes (counted in the quota).
    pub size: u64,
    /// The type the presigned URL allows.
    pub content_type: String,
    /// The SHA-256 the client announced, if any; checked at completion.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Who announced it: only they (or the admin) may complete it.
    pub uploader: Uploader,
    /// When it was announced, unix ms.
    pub created_ms: u64,
    /// When its presigned URL expires, unix ms.
    pub expires_ms: u64,
    /// Its URL puts the bytes at `<id>.upload` ([`Pending::upload_key`]).
    /// Announcements made before tern staged direct uploads have `false`:
    /// their URL puts them at `<id>` itself.
    #[serde(default)]
    pub staged: bool,
}

/// What a direct upload's key ends with before it is completed.
pub const UPLOAD_SUFFIX: &str = ".upload";

impl Pending {
    /// The key direct upload `id`'s presigned URL writes.
    pub fn upload_key(&self, id: &str) -> String {
        if self.staged {
            format!("{id}{UPLOAD_SUFFIX}")
        } else {
            id.to_owned()
        }
    }
}

/// Why an upload was not stored. Every variant leaves nothing behind.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The body is (or announces) more than `max_file_size` bytes.
    #[error("file larger than {limit} bytes")]
    TooLarge {
        /// `max_file_size`.
        limit: u64,
    },
    /// Storing the body would take the store past `max_files_bytes`.
    #[error("file store quota of {quota} bytes reached")]
    Quota {
        /// `max_files_bytes`.
        quota: u64,
    },
    /// The body did not have its announced `Content-Length` (cut off).
    #[error("request body has {got} bytes, not the {announced} announced")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// The `Content-Length`.
        announced: u64,
    },
    /// Reading the body failed (the client went away).
    #[error("cannot read request body: {0}")]
    Body(io::Error),
    /// Storing the body would leave less free disk space than
    /// `min_free_space`, which the message store needs.
    #[error(
        "{free} bytes free on the disk, and the messages need {reserve} (min_free_space): \
         files are refused until there is more"
    )]
    NoSpace {
        /// Bytes free on the data directory's file system.
        free: u64,
        /// `min_free_space`.
        reserve: u64,
    },
    /// Writing the local disk failed.
    #[error("file store: {0}")]
    Io(#[from] io::Error),
    /// The object store failed.
    #[error("{0}")]
    Down(#[from] StoreDown),
}

impl From<BlobError> for UploadError {
    fn from(e: BlobError) -> UploadError {
        match e {
            BlobError::Io(e) => UploadError::Io(e),
            BlobError::Down(e) => UploadError::Down(e),
        }
    }
}

/// Why a direct upload could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    /// No such upload announced (or it expired and was removed).
    #[error("no such upload")]
    NotFound,
    /// The object is not in the store yet: the client may PUT and retry.
    #[error("the file has not been uploaded to its URL yet")]
    NotUploaded,
    /// The object is not what was announced; it was deleted.
    #[error("{0}")]
    Mismatch(String),
    /// The local disk or the store failed; the upload can be completed later.
    #[error("{0}")]
    Store(#[from] UploadError),
    /// Another completion of the upload ran for [`COMPLETE_WAIT`] and is
    /// still running, or [`MAX_WAITING`] wait for it already; the client
    /// may retry.
    #[error("another completion of this upload is still running")]
    Busy,
}

/// How long a completion waits for another one of the same upload (a
/// client retrying one that took long) before it gives up.
const COMPLETE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Files older than `files_max_age`.
    pub expired: u64,
    /// Direct uploads never completed, partial files, orphan objects.
    pub abandoned: u64,
}

/// The catalog of stored files and the byte count of their contents.
pub struct Disk {
    /// `<data_dir>/files`: metadata (and data, local backend).
    dir: PathBuf,
    /// `<data_dir>/files/tmp`: `.part` files; same file system as `dir`, so
    /// rename is atomic.
    tmp: PathBuf,
    /// `<data_dir>/files/pending`: direct uploads in progress; made at the
    /// first one.
    pending: PathBuf,
    /// Where the bytes live.
    blobs: Blobs,
    /// `max_file_size`: largest accepted upload.
    max_file_size: u64,
    /// `max_files_bytes`: 0 means no quota.
    quota: u64,
    /// Bytes of all committed files plus uploads in progress (reserved as
    /// they stream, released if they fail) plus announced direct uploads,
    /// so concurrent uploads cannot overshoot the quota together.
    used: AtomicU64,
    /// Thumbnail counters.
    metrics: Arc<Metrics>,
    /// The message store, whose free-space reserve (`min_free_space`)
    /// uploads leave alone: files and the database share the data
    /// directory's disk.
    space: Option<Arc<Store>>,
    /// Direct uploads held by a completion or by the sweep: one at a
    /// time per upload ([`Disk::claim`]).
    claims: Mutex<Claims>,
    /// Signalled whenever a claim is let go.
    released: Condvar,
}

/// Direct uploads held ([`Claim`]), and how many completions wait for each.
#[derive(Default)]
struct Claims {
    held: HashSet<String>,
    waiting: HashMap<String, u32>,
}

/// Completions of one upload that may wait while another runs (a client
/// retrying one that took long); one more is answered 503 at once.
const MAX_WAITING: u32 = 4;

/// Holds a direct upload against every other completion and the sweep
/// while it lives; taken by [`Disk::claim`] or [`Disk::try_claim`].
struct Claim<'a> {
    disk: &'a Disk,
    id: &'a str,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.disk.claims).held.remove(self.id);
        self.disk.released.notify_all();
    }
}

/// Whether something last changed at `modified` is abandoned at `now_ms`
/// (both unix ms): untouched for [`ABANDONED_AFTER_MS`].
fn abandoned(modified: u64, now_ms: u64) -> bool {
    modified.saturating_add(ABANDONED_AFTER_MS) <= now_ms
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often a streaming upload to the local disk looks at the free space
/// again, bytes.
const SPACE_CHECK: u64 = 8 << 20;

impl Disk {
    /// Opens (creating) the catalog under `dir`: removes leftover `.part`
    /// files and (local backend) orphan data files, and adds up the stored
    /// and announced bytes.
    pub fn open(
        dir: &Path,
        blobs: Blobs,
        max_file_size: u64,
        quota: u64,
        metrics: Arc<Metrics>,
    ) -> io::Result<Disk> {
        let tmp = dir.join("tmp");
        create_dir_durable(&tmp)?;
        let mut stale = 0usize;
        for entry in fs::read_dir(&tmp)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "part") {
                fs::remove_file(&path)?;
                stale += 1;
            }
        }
        let local = matches!(blobs, Blobs::Local { .. });
        let (mut used, mut files, mut orphans) = (0u64, 0usize, 0usize);
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".json").filter(|id| is_id(id)) {
                match read_json::<Meta>(&entry.path()) {
                    Ok(meta) => {
                        used = used.saturating_add(meta.size);
                        files += 1;
                    }
                    Err(e) => tracing::warn!(id, error = %e, "unreadable file metadata"),
                }
            } else if local {
                let id = name.strip_suffix(".thumb").unwrap_or(name);
                if is_id(id) && !dir.join(format!("{id}.json")).exists() {
                    // Renamed into place but never committed, or half deleted.
                    fs::remove_file(entry.path())?;
                    orphans += 1;
                }
            }
        }
        let pending = dir.join("pending");
        let (mut announced, mut finished) = (0usize, 0usize);
        if pending.exists() {
            for entry in fs::read_dir(&pending)? {
                let path = entry?.path();
                let completed = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| dir.join(n).exists());
                if completed {
                    // A completion stopped between its metadata and the
                    // announcement's removal: the file counts, once.
                    fs::remove_file(&path)?;
                    finished += 1;
                } else if let Ok(p) = read_json::<Pending>(&path) {
                    used = used.saturating_add(p.size);
                    announced += 1;
                }
            }
            if finished > 0 {
                sync_dir(&pending)?;
            }
        }
        if stale + orphans > 0 {
            sync_dir(dir)?;
        }
        tracing::debug!(
            files,
            bytes = used,
            stale,
            orphans,
            announced,
            finished,
            backend = blobs.name(),
            "file store open"
        );
        Ok(Disk {
            dir: dir.to_path_buf(),
            tmp,
            pending,
            blobs,
            max_file_size,
            quota,
            used: AtomicU64::new(used),
            metrics,
            space: None,
            claims: Mutex::default(),
            released: Condvar::new(),
        })
    }

    /// Leaves `store`'s free-space reserve to it: uploads that would take
    /// the disk below `min_free_space` are refused.
    pub fn keep_free(&mut self, store: Arc<Store>) {
        self.space = Some(store);
    }

    /// Refuses `more` bytes for the local disk if they would leave less
    /// free space than the message store's reserve. A failed measurement
    /// refuses nothing (the write itself then fails if the disk is full).
    fn check_space(&self, more: u64) -> Result<(), UploadError> {
        let Some(store) = &self.space else {
            return Ok(());
        };
        let reserve = store.min_free_space();
        match crate::store::free_space(&self.dir) {
            Ok(free) if free.saturating_sub(more) < reserve => {
                Err(UploadError::NoSpace { free, reserve })
            }
            _ => Ok(()),
        }
    }

    /// Where the bytes live.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Refuses, before any byte is read, a body whose announced length is
    /// over the size limit or the remaining quota.
    pub fn admit(&self, announced: u64) -> Result<(), UploadError> {
        if announced > self.max_file_size {
            return Err(UploadError::TooLarge {
                limit: self.max_file_size,
            });
        }
        let used = self.used.load(Ordering::Acquire);
        if self.quota != 0 && used.saturating_add(announced) > self.quota {
            return Err(UploadError::Quota { quota: self.quota });
        }
        // With the s3 backend the bytes go to the bucket: only the reserve
        // itself is checked.
        let local = if self.blobs.s3().is_none() {
            announced
        } else {
            0
        };
        self.check_space(local)
    }

    /// Streams `body`, `announced` bytes long, into the store; returns the
    /// new id and its metadata once both are durable. The size limit and
    /// the quota are checked again while streaming: the body is only as long
    /// as its reader says, and concurrent uploads share the quota.
    pub fn upload(
        &self,
        body: &mut dyn Read,
        announced: u64,
        content_type: String,
        uploader: Uploader,
        now_ms: u64,
    ) -> Result<(String, Meta), UploadError> {
        self.admit(announced)?;
        let _streaming = Gauge::up(&self.metrics.files_uploading);
        let id = new_id();
        let mut reserved = Reservation {
            used: &self.used,
            bytes: 0,
        };
        let mut data = self.blobs.writer(&id)?;
        // The s3 backend keeps no copy: an image small enough for a
        // thumbnail is also written to a temporary file, decoded from there.
        let image = thumb::expected(&content_type).filter(|_| announced <= thumb::MAX_INPUT);
        let mut copy = match (&self.blobs, image) {
            (Blobs::S3(_), Some(_)) => Some(Part::create(&self.tmp)?),
            _ => None,
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UploadError::Body(e)),
            };
            size += n as u64;
            if size > self.max_file_size {
                return Err(UploadError::TooLarge {
                    limit: self.max_file_size,
                });
            }
            reserved.add(n as u64, self.quota)?;
            if self.blobs.s3().is_none() && size / SPACE_CHECK != (size - n as u64) / SPACE_CHECK {
                // Other uploads (and the messages) share the disk.
                self.check_space(0)?;
            }
            hasher.update(&buf[..n]);
            data.write(&buf[..n])?;
            if let Some(copy) = &mut copy {
                copy.file.write_all(&buf[..n])?;
            }
        }
        if size != announced {
            return Err(UploadError::Truncated {
                got: size,
                announced,
            });
        }
        data.commit()?;
        let source = match &copy {
            Some(part) => Some(part.path().to_path_buf()),
            None => self.blobs.local_path(&id),
        };
        let thumbnail = match (image, source) {
            (Some(format), Some(source)) => self.thumbnail(&id, format, &source),
            _ => None,
        };
        drop(copy);
        let meta = Meta {
            size,
            sha256: hex::encode(hasher.finalize()),
            content_type,
            uploader,
            created_ms: now_ms,
            thumbnail,
        };
        if let Err(e) = self.write_json(&self.dir, &id, &meta) {
            self.remove_blobs(&id, thumbnail.is_some());
            return Err(e.into());
        }
        // Committed: from here on the file and its bytes stay.
        reserved.keep();
        Ok((id, meta))
    }

    /// Makes and stores the thumbnail of file `id` from the image at
    /// `source`; its size, or `None` (logged) when the image gets none.
    fn thumbnail(&self, id: &str, format: image::ImageFormat, source: &Path) -> Option<u64> {
        match thumb::make(source, format) {
            Ok(bytes) => {
                let len = bytes.len() as u64;
                match self.blobs.put(&thumb_key(id), bytes) {
                    Ok(()) => {
                        self.metrics.thumbnails.fetch_add(1, Ordering::Relaxed);
                        Some(len)
                    }
                    Err(e) => {
                        tracing::warn!(id, error = %e, "cannot store thumbnail");
                        None
                    }
                }
            }
            Err(refused) => {
                self.metrics
                    .thumbnails_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(id, reason = %refused, "image stored without a thumbnail");
                None
            }
        }
    }

    /// The metadata of file `id`, or `None` if there is no such file.
    /// `id` must have passed [`is_id`].
    pub fn meta(&self, id: &str) -> io::Result<Option<Meta>> {
        debug_assert!(is_id(id));
        match read_json(&self.dir.join(format!("{id}.json"))) {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes file `id` whose metadata is `meta`. `Ok(false)` if another
    /// delete got there first. `id` must have passed [`is_id`].
    pub fn delete(&self, id: &str, meta: &Meta) -> io::Result<bool> {
        debug_assert!(is_id(id));
        match fs::remove_file(self.dir.join(format!("{id}.json"))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        // Only the delete that removed the metadata gets here, once per file.
        // A direct upload's announcement that a completion failed to
        // remove goes too: left, a PUT to its URL and a completion would
        // bring the file back.
        self.forget(id);
        self.release(meta.size);
        self.remove_blobs(id, meta.thumbnail.is_some());
        sync_dir(&self.dir)?;
        Ok(true)
    }

    /// Removes the bytes (and thumbnail) of a file whose metadata is gone.
    /// A failure leaves an orphan, which the next start or sweep removes.
    fn remove_blobs(&self, id: &str, thumbnail: bool) {
        let mut keys = vec![id.to_owned()];
        if thumbnail {
            keys.push(thumb_key(id));
        }
        for key in keys {
            if let Err(e) = self.blobs.delete(&key) {
                tracing::warn!(key, error = %e, "cannot remove file data");
            }
        }
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// Announces a direct upload: checks the size and the quota, reserves
    /// the bytes and records it; returns its new id.
    pub fn announce(&self, pending: &Pending) -> Result<String, UploadError> {
        self.admit(pending.size)?;
        let mut reserved = Reservation {
            used: &self.used,
            bytes: 0,
        };
        reserved.add(pending.size, self.quota)?;
        create_dir_durable(&self.pending)?;
        let id = new_id();
        self.write_json(&self.pending, &id, pending)?;
        reserved.keep();
        Ok(id)
    }

    /// The direct upload `id`, if announced and not completed.
    pub fn pending(&self, id: &str) -> io::Result<Option<Pending>> {
        debug_assert!(is_id(id));
        match read_json(&self.pending.join(format!("{id}.json"))) {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Claims direct upload `id` for a completion. While another holds it,
    /// waits up to [`COMPLETE_WAIT`] for it to be let go, alongside at most
    /// [`MAX_WAITING`] others; `None` if it is still held then, or if as
    /// many wait already.
    fn claim<'a>(&'a self, id: &'a str) -> Option<Claim<'a>> {
        let mut claims = lock(&self.claims);
        if claims.held.contains(id) {
            let waiting = claims.waiting.entry(id.to_owned()).or_default();
            if *waiting >= MAX_WAITING {
                return None;
            }
            *waiting += 1;
            let deadline = std::time::Instant::now() + COMPLETE_WAIT;
            while claims.held.contains(id) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                claims = match self.released.wait_timeout(claims, left) {
                    Ok((claims, _)) => claims,
                    Err(e) => e.into_inner().0,
                };
            }
            if let Some(n) = claims.waiting.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    claims.waiting.remove(id);
                }
            }
            if claims.held.contains(id) {
                return None;
            }
        }
        claims.held.insert(id.to_owned());
        Some(Claim { disk: self, id })
    }

    /// Claims direct upload `id` if no one holds it (the sweep never waits).
    fn try_claim<'a>(&'a self, id: &'a str) -> Option<Claim<'a>> {
        // (A Claim made and not returned would let go of the claim it
        // does not hold: made only once the claim is taken.)
        let taken = lock(&self.claims).held.insert(id.to_owned());
        taken.then(|| Claim { disk: self, id })
    }

    /// Removes direct upload `id`'s announcement, if there is one; returns
    /// whether it is gone. A failure is logged (a completion then finds the
    /// metadata, and a start removes the announcement).
    fn forget(&self, id: &str) -> bool {
        let record = self.pending.join(format!("{id}.json"));
        // Only a removal is synced: every delete of a file calls this, most
        // with no announcement (and, on the local backend, no `pending/`).
        let removed = match fs::remove_file(&record) {
            Ok(()) => sync_dir(&self.pending),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(id, error = %e, "cannot remove a direct upload's announcement");
                false
            }
        }
    }

    /// Completes direct upload `id` once its object is in the store:
    /// copies it from where its URL put it to `<id>`, reads the copy once
    /// to check its size and hash it (and make the thumbnail), writes the
    /// metadata, then removes the announcement and the upload's object. An
    /// object that is not what was announced is deleted with the
    /// announcement.
    ///
    /// One completion of an upload runs at a time, holding its claim; the
    /// announcement stays in place meanwhile, so a second one (a client
    /// retrying) passes the uploader check, waits for the claim, and then
    /// finds the metadata, or the announcement again if the first failed.
    pub fn complete(&self, id: &str, now_ms: u64) -> Result<(Meta, bool), CompleteError> {
        debug_assert!(is_id(id));
        let Some(_claim) = self.claim(id) else {
            return Err(CompleteError::Busy);
        };
        let record = self.pending.join(format!("{id}.json"));
        let pending: Pending = match read_json(&record) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return match self.meta(id).map_err(UploadError::Io)? {
                    Some(meta) => Ok((meta, false)),
                    None => Err(CompleteError::NotFound),
                };
            }
            Err(e) => return Err(UploadError::Io(e).into()),
        };
        if let Some(meta) = self.meta(id).map_err(UploadError::Io)? {
            // Completed, and the announcement's removal failed: its bytes
            // are the file's now.
            self.forget(id);
            return Ok((meta, false));
        }
        let source = pending.upload_key(id);
        let refuse = |why: String| {
            for key in [source.as_str(), id] {
                if let Err(e) = self.blobs.delete(key) {
                    tracing::warn!(key, error = %e, "cannot remove a refused upload");
                }
            }
            // Still there, it keeps its bytes counted until the sweep
            // removes it at its expiry.
            if self.forget(id) {
                self.release(pending.size);
            }
            Err(CompleteError::Mismatch(why))
        };
        let found = match self.blobs.size(&source) {
            Ok(Some(n)) => n,
            Ok(None) => return Err(CompleteError::NotUploaded),
            Err(e) => return Err(UploadError::from(e).into()),
        };
        if found != pending.size {
            return refuse(format!(
                "the store holds {found} bytes, {} were announced",
                pending.size
            ));
        }
        // From here on the bytes are tern's copy: the URL may still put
        // others where it points, but never at `<id>`.
        if pending.staged {
            self.blobs.copy(&source, id).map_err(UploadError::from)?;
        }
        let image =
            thumb::expected(&pending.content_type).filter(|_| pending.size <= thumb::MAX_INPUT);
        let (sha256, read, copy) = (|| -> Result<(String, u64, Option<Part>), UploadError> {
            let mut copy = match image {
                Some(_) => Some(Part::create(&self.tmp)?),
                None => None,
            };
            let Some(mut reader) = self.blobs.open(id, found, 0, found)? else {
                return Err(UploadError::Io(io::ErrorKind::NotFound.into()));
            };
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut read = 0u64;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreDown(e.to_string()).into()),
                };
                hasher.update(&buf[..n]);
                read += n as u64;
                if let Some(copy) = &mut copy {
                    copy.file.write_all(&buf[..n])?;
                }
            }
            Ok((hex::encode(hasher.finalize()), read, copy))
        })()?;
        if read != found {
            return refuse(format!(
                "the store holds {read} bytes, {} were announced",
                pending.size
            ));
        }
        if let Some(announced) = &pending.sha256 {
            if !announced.eq_ignore_ascii_case(&sha256) {
                return refuse(format!(
                    "the stored bytes have SHA-256 {sha256}, {announced} was announced"
                ));
            }
        }
        let thumbnail = match (image, &copy) {
            (Some(format), Some(copy)) => self.thumbnail(id, format, copy.path()),
            _ => None,
        };
        drop(copy);
        let meta = Meta {
            size: found,
            sha256,
            content_type: pending.content_type,
            uploader: pending.uploader,
            created_ms: now_ms,
            thumbnail,
        };
        // The commit point; the announced bytes are the file's from here.
        self.write_json(&self.dir, id, &meta)
            .map_err(UploadError::Io)?;
        self.forget(id);
        if pending.staged {
            // Left behind, it is an orphan: the sweep removes it.
            if let Err(e) = self.blobs.delete(&source) {
                tracing::warn!(key = source, error = %e, "cannot remove a completed upload's object");
            }
        }
        Ok((meta, true))
    }

    /// One pass of the retention sweep at `now_ms`: files older than
    /// `max_age_ms` (0: none), direct uploads whose URL expired more than
    /// `grace_ms` ago, and, when `orphans` is set, partial files and
    /// objects that no metadata names, older than [`ABANDONED_AFTER_MS`].
    pub fn sweep(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        grace_ms: u64,
        orphans: bool,
    ) -> Result<Swept, BlobError> {
        let mut swept = Swept::default();
        if max_age_ms > 0 {
            for (id, meta) in self.all_meta()? {
                if meta.created_ms.saturating_add(max_age_ms) <= now_ms
                    && self.delete(&id, &meta)?
                {
                    tracing::info!(id, size = meta.size, "file expired (files_max_age)");
                    swept.expired += 1;
                }
            }
        }
        if self.pending.exists() {
            for entry in fs::read_dir(&self.pending)? {
                let path = entry?.path();
                let Some(id) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .filter(|s| is_id(s))
                    .map(str::to_owned)
                else {
                    continue;
                };
                let Ok(pending) = read_json::<Pending>(&path) else {
                    continue;
                };
                if pending.expires_ms.saturating_add(grace_ms) > now_ms {
                    continue;
                }
                // Claimed like a completion, so the two never both act: a
                // completion running now is left to end.
                let Some(_claim) = self.try_claim(&id) else {
                    continue;
                };
                if !path.exists() {
                    continue; // completed or refused meanwhile
                }
                match self.meta(&id) {
                    Ok(None) => {}
                    Ok(Some(_)) => {
                        self.forget(&id); // completed; its removal had failed
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(id, error = %e, "unreadable file metadata");
                        continue;
                    }
                }
                // `<id>` too: a completion that failed after its copy
                // leaves one. The announcement goes last: until then the
                // next sweep tries again.
                self.blobs.delete(&pending.upload_key(&id))?;
                self.blobs.delete(&id)?;
                fs::remove_file(&path)?;
                sync_dir(&self.pending)?;
                self.release(pending.size);
                tracing::info!(
                    id,
                    size = pending.size,
                    "direct upload never completed: removed"
                );
                swept.abandoned += 1;
            }
        }
        if orphans {
            swept.abandoned += self.sweep_orphans(now_ms)?;
        }
        Ok(swept)
    }

    /// Removes stale partial files and (s3) objects no metadata names.
    fn sweep_orphans(&self, now_ms: u64) -> Result<u64, BlobError> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64)
                })
                .unwrap_or(u64::MAX);
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "part") && abandoned(modified, now_ms) {
                fs::remove_file(&path)?;
                tracing::info!(path = %path.display(), "abandoned partial upload removed");
                removed += 1;
            }
        }
        if let Blobs::S3(s3) = &self.blobs {
            // Decided first, deleted after, so that no call to the store
            // holds up a completion (an object nothing names stays so).
            let orphans: Vec<String> = s3
                .list()?
                .into_iter()
                .filter(|(key, modified)| self.is_orphan(key, *modified, now_ms))
                .map(|(key, _)| key)
                .collect();
            for key in orphans {
                s3.delete(&key)?;
                tracing::info!(key, "object without metadata removed");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether object `key`, last changed at `modified` (unix ms), is an
    /// orphan at `now_ms`: one of tern's that nothing names, an hour old
    /// ([`ABANDONED_AFTER_MS`]). A direct upload's own object needs no
    /// age: its announcement is written before its URL exists, so without
    /// one (or a completion) it is what the URL put after the completion.
    /// Once true for a key, it stays true: ids are never made twice, and an
    /// announcement, once removed, never comes back.
    fn is_orphan(&self, key: &str, modified: u64, now_ms: u64) -> bool {
        (key.ends_with(UPLOAD_SUFFIX) || abandoned(modified, now_ms))
            && self.unnamed(key, &lock(&self.claims))
    }

    /// Whether object `key` is one of tern's that nothing names: no
    /// metadata (for `<id>` and `<id>.thumb`; a direct upload's own object
    /// is needed only until its completion copies it), no announcement,
    /// and no completion or sweep holding it (`claims`, locked by the
    /// caller).
    fn unnamed(&self, key: &str, claims: &Claims) -> bool {
        let (id, upload) = match key.strip_suffix(UPLOAD_SUFFIX) {
            Some(id) => (id, true),
            None => (key.strip_suffix(".thumb").unwrap_or(key), false),
        };
        is_id(id)
            && !claims.held.contains(id)
            && !self.pending.join(format!("{id}.json")).exists()
            && (upload || !self.dir.join(format!("{id}.json")).exists())
    }

    /// Every file's id and metadata.
    fn all_meta(&self) -> io::Result<Vec<(String, Meta)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|id| is_id(id))
            else {
                continue;
            };
            if let Ok(meta) = read_json::<Meta>(&entry.path()) {
                out.push((id.to_owned(), meta));
            }
        }
        Ok(out)
    }

    /// Writes `value` as `<dir>/<id>.json` through a synced `.part` file
    /// and a rename.
    fn write_json(&self, dir: &Path, id: &str, value: &impl Serialize) -> io::Result<()> {
        let mut json = Part::create(&self.tmp)?;
        json.file
            .write_all(&serde_json::to_vec(value).map_err(io::Error::other)?)?;
        json.file.sync_all()?;
        json.rename(dir.join(format!("{id}.json")))?;
        sync_dir(dir)?;
        json.keep();
        Ok(())
    }
}

/// Reads and parses a JSON file of the catalog.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<T> {
    let mut bytes = Vec::new();
    File::open(path)?.take(MAX_META).read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One unit of a gauge, held while something is in progress.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(gauge: &'a AtomicU64) -> Gauge<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes of an upload in progress counted in [`Disk::used`]; given back on
/// drop unless [`Reservation::keep`] was called.
struct Reservation<'a> {
    /// The store's counter.
    used: &'a AtomicU64,
    /// Bytes this upload added to it so far.
    bytes: u64,
}

impl Reservation<'_> {
    /// Counts `n` more bytes; fails if that takes the total past `quota`
    /// (0: no quota). On failure the bytes stay counted until drop.
    fn add(&mut self, n: u64, quota: u64) -> Result<(), UploadError> {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        self.bytes += n;
        if quota != 0 && before.saturating_add(n) > quota {
            return Err(UploadError::Quota { quota });
        }
        Ok(())
    }

    fn keep(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn local(dir: &Path, max: u64, quota: u64) -> Disk {
        let blobs = Blobs::Local {
            dir: dir.to_path_buf(),
            tmp: dir.join("tmp"),
        };
        Disk::open(dir, blobs, max, quota, Arc::default()).unwrap()
    }

    fn read_all(disk: &Disk, id: &str, size: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        disk.blobs
            .open(id, size, 0, size)
            .unwrap()
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    }

    #[test]
    fn ids() {
        assert!(is_id(&new_id()));
        assert!(is_id("0123456789abcdef0123456789abcdef"));
        for bad in [
            "",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "../../etc/passwd",
            "%2e%2e%2f",
            "0123456789abcdef0123456789abcde\0",
            "0123456789abcdef0123456789abcd/.",
        ] {
            assert!(!is_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn upload_read_delete() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 100, 0);
        let (id, meta) = disk
            .upload(
                &mut &b"hello"[..],
                5,
                "text/plain".into(),
                Uploader::User("alice".into()),
                1,
            )
            .unwrap();
        assert_eq!(meta.size, 5);
        assert_eq!(
            meta.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            files(dir.path()),
            vec![id.clone(), format!("{id}.json"), "tmp".into()]
        );
        assert!(files(&dir.path().join("tmp")).is_empty());
        assert_eq!(disk.used.load(Ordering::Relaxed), 5);
        let again = disk.meta(&id).unwrap().unwrap();
        assert_eq!(again.uploader, Uploader::User("alice".into()));
        assert_eq!(read_all(&disk, &id, 5), b"hello");
        // Metadata and bytes that disagree are an error, not a short file.
        assert!(disk.blobs.open(&id, 6, 0, 6).is_err());

        let reopened = local(dir.path(), 100, 0);
        assert_eq!(reopened.used.load(Ordering::Relaxed), 5);

        assert!(disk.delete(&id, &meta).unwrap());
        assert!(!disk.delete(&id, &meta).unwrap());
        assert_eq!(disk.used.load(Ordering::Relaxed), 0);
        assert!(disk.meta(&id).unwrap().is_none());
        assert_eq!(files(dir.path()), vec!["tmp".to_owned()]);
    }

    #[test]
    fn failures_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 10, 15);
        let up = |body: &[u8], announced| {
            disk.upload(&mut &body[..], announced, String::new(), Uploader::Admin, 0)
        };
        let too_large = |r| matches!(r, Err(UploadError::TooLarge { .. }));
        let quota = |r| matches!(r, Err(UploadError::Quota { .. }));
        let truncated = |r| matches!(r, Err(UploadError::Truncated { .. }));
        assert!(too_large(up(&[0; 1], 11)));
        assert!(truncated(up(&[0; 5], 6)));
        up(&[0; 10], 10).unwrap();
        assert!(quota(up(&[0; 6], 6)));
        // A body longer than announced is caught while streaming (tiny_http
        // never hands one over, but the checks do not rely on that).
        assert!(too_large(up(&[0; 11], 5)));
        assert!(quota(up(&[0; 6], 1)));
        assert!(truncated(up(&[0; 2], 1)));
        assert_eq!(disk.used.load(Ordering::Relaxed), 10);
        up(&[0; 5], 5).unwrap();
        assert_eq!(disk.used.load(Ordering::Relaxed), 15);
        assert_eq!(files(dir.path()).len(), 5);
        assert!(files(&dir.path().join("tmp")).is_empty());
    }

    #[test]
    fn open_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 100, 0);
        let (id, _) = disk
            .upload(&mut &b"abc"[..], 3, String::new(), Uploader::Admin, 0)
            .unwrap();
        let orphan = "f".repeat(32);
        fs::write(dir.path().join(&orphan), b"x").unwrap();
        fs::write(dir.path().join(format!("{orphan}.thumb")), b"x").unwrap();
        fs::write(dir.path().join("tmp/abc.part"), b"x").unwrap();
        fs::write(dir.path().join("unrelated"), b"x").unwrap();
        let disk = local(dir.path(), 100, 0);
        assert_eq!(disk.used.load(Ordering::Relaxed), 3);
        assert_eq!(
            files(dir.path()),
            vec![
                id.clone(),
                format!("{id}.json"),
                "tmp".into(),
                "unrelated".into()
            ]
        );
        assert!(files(&dir.path().join("tmp")).is_empty());
    }

    #[test]
    fn sweep_expires_old_files_and_stale_parts() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 100, 0);
        let (old, _) = disk
            .upload(&mut &b"old"[..], 3, String::new(), Uploader::Admin, 1_000)
            .unwrap();
        let (new, _) = disk
            .upload(&mut &b"new"[..], 3, String::new(), Uploader::Admin, 9_000)
            .unwrap();
        let swept = disk.sweep(10_000, 5_000, 0, false).unwrap();
        assert_eq!(
            swept,
            Swept {
                expired: 1,
                abandoned: 0
            }
        );
        assert!(disk.meta(&old).unwrap().is_none());
        assert!(disk.meta(&new).unwrap().is_some());
        assert_eq!(disk.used.load(Ordering::Relaxed), 3);
        // A partial file is abandoned once it has not changed for an hour.
        fs::write(dir.path().join("tmp/x.part"), b"x").unwrap();
        assert_eq!(disk.sweep(now(), 0, 0, true).unwrap().abandoned, 0);
        let later = now() + ABANDONED_AFTER_MS;
        assert_eq!(disk.sweep(later, 0, 0, true).unwrap().abandoned, 1);
        assert!(files(&dir.path().join("tmp")).is_empty());
    }

    /// Announces a direct upload of 5 bytes and puts "hello" where its URL
    /// would; returns its id.
    fn uploaded_hello(disk: &Disk, dir: &Path) -> String {
        let pending = Pending {
            size: 5,
            content_type: "text/plain".into(),
            sha256: None,
            uploader: Uploader::Admin,
            created_ms: 0,
            expires_ms: u64::MAX,
            staged: true,
        };
        let id = disk.announce(&pending).unwrap();
        fs::write(dir.join(pending.upload_key(&id)), b"hello").unwrap();
        id
    }

    /// Waits until `n` completions of `id` wait for its claim, or `done`.
    fn until_waiting(disk: &Disk, id: &str, n: u32, done: impl Fn() -> bool) {
        while lock(&disk.claims).waiting.get(id).copied().unwrap_or(0) < n && !done() {
            std::thread::yield_now();
        }
    }

    /// A completion sent while another of the same upload runs (a client
    /// retrying one that took long) waits for it, then answers as it
    /// ended; where it used to answer 404 at once. One more than
    /// `MAX_WAITING` is answered Busy at once.
    #[test]
    fn completions_of_one_upload_wait_for_each_other_within_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 100, 0);
        let id = uploaded_hello(&disk, dir.path());
        // The first completion, holding the claim.
        let first = disk.claim(&id).unwrap();
        std::thread::scope(|s| {
            let waiters: Vec<_> = (0..MAX_WAITING)
                .map(|_| s.spawn(|| disk.complete(&id, 2)))
                .collect();
            until_waiting(&disk, &id, MAX_WAITING, || {
                waiters.iter().any(|w| w.is_finished())
            });
            let extra = s.spawn(|| disk.complete(&id, 2));
            until_waiting(&disk, &id, MAX_WAITING + 1, || extra.is_finished());
            assert!(extra.is_finished(), "one waiter too many waits");
            assert!(matches!(extra.join().unwrap(), Err(CompleteError::Busy)));
            // The first ends without completing (the bytes were not there
            // yet, say): the waiters complete it, one of them first.
            drop(first);
            let answers: Vec<(Meta, bool)> = waiters
                .into_iter()
                .map(|w| w.join().unwrap().expect("completed"))
                .collect();
            assert_eq!(answers.iter().filter(|(_, new)| *new).count(), 1);
            assert!(answers.iter().all(|(meta, _)| meta.size == 5));
        });
        let claims = lock(&disk.claims);
        assert!(claims.held.is_empty() && claims.waiting.is_empty());
    }

    /// A direct upload completed whose announcement is left, as by a
    /// completion stopped (or failing) between its metadata and the
    /// announcement's removal; returns its id, its metadata and the
    /// announcement's path.
    fn completed_with_its_announcement_left(disk: &Disk, dir: &Path) -> (String, Meta, PathBuf) {
        let id = uploaded_hello(disk, dir);
        let record = dir.join(format!("pending/{id}.json"));
        let kept = fs::read(&record).unwrap();
        let (meta, _) = disk.complete(&id, 1).unwrap();
        fs::write(&record, kept).unwrap();
        (id, meta, record)
    }

    /// A completion stopped between its metadata and the removal of the
    /// announcement: the next start removes the announcement, and the
    /// file's bytes count once.
    #[test]
    fn a_start_forgets_announcements_of_completed_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 100, 0);
        let (id, _, record) = completed_with_its_announcement_left(&disk, dir.path());
        drop(disk);
        let disk = local(dir.path(), 100, 0);
        assert!(!record.exists());
        assert_eq!(disk.used.load(Ordering::Relaxed), 5);
        assert!(!disk.complete(&id, 2).unwrap().1);
    }

    /// A file deleted while an announcement its completion failed to
    /// remove is still there: the announcement goes too, so its URL and a
    /// completion cannot bring the file back.
    #[test]
    fn a_delete_forgets_an_announcement_left_by_its_completion() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 100, 0);
        let (id, meta, record) = completed_with_its_announcement_left(&disk, dir.path());
        assert!(disk.delete(&id, &meta).unwrap());
        assert!(!record.exists());
        fs::write(dir.path().join(format!("{id}{UPLOAD_SUFFIX}")), b"again").unwrap();
        assert!(matches!(
            disk.complete(&id, 2),
            Err(CompleteError::NotFound)
        ));
        assert_eq!(disk.used.load(Ordering::Relaxed), 0);
    }

    /// A direct upload's bytes are copied from its own object at
    /// completion, and the orphan sweep takes none of its objects while its
    /// claim is held (by a completion, or by the sweep of its expired
    /// announcement).
    #[test]
    fn a_completion_copies_the_upload_and_the_sweep_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let disk = local(dir.path(), 100, 0);
        let id = uploaded_hello(&disk, dir.path());
        let upload = format!("{id}{UPLOAD_SUFFIX}");
        assert!(dir.path().join(&upload).exists());
        let thumb = format!("{id}.thumb");
        let unnamed = |key: &str| disk.unnamed(key, &lock(&disk.claims));
        assert!(!unnamed(&id) && !unnamed(&upload));
        assert!(!unnamed("tern.txt"));
        let (fresh, old) = (now(), now() - ABANDONED_AFTER_MS);

        // Claimed, with the announcement gone: the expiry sweep between
        // the two.
        let record = dir.path().join(format!("pending/{id}.json"));
        let aside = dir.path().join("aside");
        fs::rename(&record, &aside).unwrap();
        {
            let _held = disk.try_claim(&id).unwrap();
            assert!(disk.try_claim(&id).is_none());
            assert!(!unnamed(&id) && !unnamed(&upload) && !unnamed(&thumb));
            assert!(!disk.is_orphan(&id, old, now()));
        }
        assert!(unnamed(&id) && unnamed(&upload));
        assert!(disk.is_orphan(&id, old, now()) && !disk.is_orphan(&id, fresh, now()));
        fs::rename(&aside, &record).unwrap();

        let (meta, new) = disk.complete(&id, 1).unwrap();
        assert!(new);
        assert_eq!(meta.size, 5);
        assert_eq!(read_all(&disk, &id, 5), b"hello");
        assert!(!dir.path().join(&upload).exists() && !record.exists());
        assert!(lock(&disk.claims).held.is_empty());
        // Completed: the file is named by its metadata; what the URL puts
        // at its own key from now on is an orphan.
        assert!(!unnamed(&id) && !unnamed(&thumb));
        assert!(unnamed(&upload));
        assert!(!disk.is_orphan(&id, old, now()));
        assert!(disk.is_orphan(&upload, fresh, now()), "however new");
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }
}
