//! The file store on disk, and the only code here that touches it.
//!
//! ```text
//! <data_dir>/files/<id>          the bytes, exactly as uploaded
//! <data_dir>/files/<id>.json     metadata (Meta); its presence is the commit point
//! <data_dir>/files/tmp/<r>.part  uploads and metadata being written; removed at start
//! ```
//!
//! `<id>` is 32 lowercase hex characters (128 random bits) made here, and
//! `<r>` likewise: no path ever holds client-supplied text, and [`is_id`]
//! gates every id that comes from a URL before any path is built from it.
//!
//! An upload streams into a `.part` file while hashing and counting, is
//! fsync'd, renamed to `<id>`, the directory fsync'd; then the metadata goes
//! through the same steps to `<id>.json`. A crash before the metadata rename
//! leaves an orphan `<id>` (removed at the next start) and no answer to the
//! client. A delete removes `<id>.json` first, then `<id>`.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes read from the request and written to disk per step.
const CHUNK: usize = 64 * 1024;
/// Largest metadata file read; real ones are a few hundred bytes.
const MAX_META: u64 = 64 * 1024;
/// Length of an id: hex of 128 bits.
const ID_LEN: usize = 32;

/// Whether `s` is an id as this store makes them: exactly 32 lowercase hex
/// characters. Anything else (`..`, `/`, `%2e`, NUL, …) is refused before a
/// path is formed.
pub fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random id.
fn new_id() -> String {
    hex::encode(rand::random::<[u8; ID_LEN / 2]>())
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
    /// Writing the store failed.
    #[error("file store: {0}")]
    Io(#[from] io::Error),
}

/// The directory of stored files and the byte count of its contents.
pub struct Disk {
    /// `<data_dir>/files`: data and metadata files.
    dir: PathBuf,
    /// `<data_dir>/files/tmp`: `.part` files; same file system as `dir`, so
    /// rename is atomic.
    tmp: PathBuf,
    /// `max_file_size`: largest accepted upload.
    max_file_size: u64,
    /// `max_files_bytes`: 0 means no quota.
    quota: u64,
    /// Bytes of all committed files plus uploads in progress (reserved as
    /// they stream, released if they fail), so concurrent uploads cannot
    /// overshoot the quota together.
    used: AtomicU64,
}

impl Disk {
    /// Opens (creating) the store under `dir`: removes leftover `.part`
    /// files and orphan data files, and adds up the stored bytes.
    pub fn open(dir: &Path, max_file_size: u64, quota: u64) -> io::Result<Disk> {
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp)?;
        let mut stale = 0usize;
        for entry in fs::read_dir(&tmp)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "part") {
                fs::remove_file(&path)?;
                stale += 1;
            }
        }
        let (mut used, mut files, mut orphans) = (0u64, 0usize, 0usize);
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".json").filter(|id| is_id(id)) {
                match read_meta(&entry.path()) {
                    Ok(meta) => {
                        used = used.saturating_add(meta.size);
                        files += 1;
                    }
                    Err(e) => tracing::warn!(id, error = %e, "unreadable file metadata"),
                }
            } else if is_id(name) && !dir.join(format!("{name}.json")).exists() {
                // Renamed into place but never committed, or half deleted.
                fs::remove_file(entry.path())?;
                orphans += 1;
            }
        }
        if stale + orphans > 0 {
            sync_dir(dir)?;
        }
        tracing::debug!(files, bytes = used, stale, orphans, "file store open");
        Ok(Disk {
            dir: dir.to_path_buf(),
            tmp,
            max_file_size,
            quota,
            used: AtomicU64::new(used),
        })
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
        Ok(())
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
        let mut data = Part::create(&self.tmp)?;
        let mut reserved = Reservation {
            used: &self.used,
            bytes: 0,
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
            hasher.update(&buf[..n]);
            data.file.write_all(&buf[..n])?;
        }
        if size != announced {
            return Err(UploadError::Truncated {
                got: size,
                announced,
            });
        }
        data.file.sync_all()?;
        let id = new_id();
        data.rename(self.dir.join(&id))?;
        sync_dir(&self.dir)?;

        let meta = Meta {
            size,
            sha256: hex::encode(hasher.finalize()),
            content_type,
            uploader,
            created_ms: now_ms,
        };
        let mut json = Part::create(&self.tmp)?;
        json.file
            .write_all(&serde_json::to_vec(&meta).map_err(io::Error::other)?)?;
        json.file.sync_all()?;
        json.rename(self.dir.join(format!("{id}.json")))?;
        sync_dir(&self.dir)?;
        // Committed: from here on the files and their bytes stay.
        json.keep();
        data.keep();
        reserved.keep();
        Ok((id, meta))
    }

    /// The metadata of file `id`, or `None` if there is no such file.
    /// `id` must have passed [`is_id`].
    pub fn meta(&self, id: &str) -> io::Result<Option<Meta>> {
        debug_assert!(is_id(id));
        match read_meta(&self.dir.join(format!("{id}.json"))) {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the bytes of file `id` for reading, or `None` if they are gone
    /// (deleted since the metadata was read). `id` must have passed [`is_id`].
    pub fn open_data(&self, id: &str) -> io::Result<Option<File>> {
        debug_assert!(is_id(id));
        match File::open(self.dir.join(id)) {
            Ok(f) => Ok(Some(f)),
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
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(meta.size))
            });
        match fs::remove_file(self.dir.join(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // An orphan now; the next start removes it.
            Err(e) => tracing::warn!(id, error = %e, "cannot remove file data"),
        }
        sync_dir(&self.dir)?;
        Ok(true)
    }
}

/// Reads and parses a metadata file.
fn read_meta(path: &Path) -> io::Result<Meta> {
    let mut bytes = Vec::new();
    File::open(path)?.take(MAX_META).read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Makes renames and removals in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A file being written under a temporary name; removed on drop unless
/// [`Part::keep`] was called, wherever it has been renamed to by then.
struct Part {
    /// Where the file is now.
    path: PathBuf,
    /// Open for writing.
    file: File,
    /// Set once committed: drop leaves the file alone.
    kept: bool,
}

impl Part {
    /// A new, empty `<tmp>/<random>.part`.
    fn create(tmp: &Path) -> io::Result<Part> {
        let path = tmp.join(format!("{}.part", new_id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Part {
            path,
            file,
            kept: false,
        })
    }

    /// Renames the file; a later drop removes it at its new place.
    fn rename(&mut self, to: PathBuf) -> io::Result<()> {
        fs::rename(&self.path, &to)?;
        self.path = to;
        Ok(())
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.kept {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove partial file");
            }
        }
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
        let disk = Disk::open(dir.path(), 100, 0).unwrap();
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
        let mut bytes = Vec::new();
        disk.open_data(&id)
            .unwrap()
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        assert_eq!(bytes, b"hello");

        let reopened = Disk::open(dir.path(), 100, 0).unwrap();
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
        let disk = Disk::open(dir.path(), 10, 15).unwrap();
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
        let disk = Disk::open(dir.path(), 100, 0).unwrap();
        let (id, _) = disk
            .upload(&mut &b"abc"[..], 3, String::new(), Uploader::Admin, 0)
            .unwrap();
        let orphan = "f".repeat(32);
        fs::write(dir.path().join(&orphan), b"x").unwrap();
        fs::write(dir.path().join("tmp/abc.part"), b"x").unwrap();
        fs::write(dir.path().join("unrelated"), b"x").unwrap();
        let disk = Disk::open(dir.path(), 100, 0).unwrap();
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
}
