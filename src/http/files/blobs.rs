//! The storage seam: where the bytes of files and thumbnails live.
//!
//! [`Blobs::Local`] keeps them in `<data_dir>/files/` beside the metadata,
//! [`Blobs::S3`] in a bucket ([`super::s3`]). Both answer the same calls:
//! a writer that commits an object whole or leaves nothing, a ranged
//! reader, a copy, a delete, and (for the sweep) a listing. Keys are
//! `<id>`, `<id>.thumb` and `<id>.upload` (a direct upload's bytes before
//! completion), never client text.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::s3::{S3Writer, StoreDown, S3};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The local disk failed (or is full).
    #[error("file store: {0}")]
    Io(#[from] io::Error),
    /// The object store is unreachable or refused: 503 for the client.
    #[error("{0}")]
    Down(#[from] StoreDown),
}

/// Where bytes live.
pub enum Blobs {
    /// `<data_dir>/files/<key>`, written through `tmp/`.
    Local {
        /// `<data_dir>/files`.
        dir: PathBuf,
        /// `<data_dir>/files/tmp`, same file system as `dir`.
        tmp: PathBuf,
    },
    /// A bucket.
    S3(Box<S3>),
}

impl Blobs {
    /// The name of the backend, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Blobs::Local { .. } => "local",
            Blobs::S3(_) => "s3",
        }
    }

    /// The bucket, when the files are in one.
    pub fn s3(&self) -> Option<&S3> {
        match self {
            Blobs::Local { .. } => None,
            Blobs::S3(s3) => Some(s3),
        }
    }

    /// A writer for the new object `key`.
    pub fn writer(&self, key: &str) -> Result<Writer<'_>, BlobError> {
        Ok(match self {
            Blobs::Local { dir, tmp } => Writer::Local {
                part: Part::create(tmp)?,
                to: dir.join(key),
                dir,
            },
            Blobs::S3(s3) => Writer::S3(s3.writer(key)),
        })
    }

    /// Stores a small object whole (a thumbnail).
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BlobError> {
        match self {
            Blobs::S3(s3) => Ok(s3.put(key, bytes)?),
            Blobs::Local { .. } => {
                let mut w = self.writer(key)?;
                w.write(&bytes)?;
                w.commit()
            }
        }
    }

    /// The file of `key` on this disk (local backend only).
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        match self {
            Blobs::Local { dir, .. } => Some(dir.join(key)),
            Blobs::S3(_) => None,
        }
    }

    /// `len` bytes of `key` from `start`, or `None` if it is gone. The
    /// object must hold exactly `size` bytes: anything else is an error
    /// (the store and the metadata disagree).
    pub fn open(
        &self,
        key: &str,
        size: u64,
        start: u64,
        len: u64,
    ) -> Result<Option<Box<dyn Read + Send>>, BlobError> {
        let found = match self {
            Blobs::Local { dir, .. } => {
                let mut file = match File::open(dir.join(key)) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let found = file.metadata()?.len();
                if found == size {
                    file.seek(SeekFrom::Start(start))?;
                    return Ok(Some(Box::new(file.take(len))));
                }
                found
            }
            Blobs::S3(s3) => match s3.read(key, start, len)? {
                None => return Ok(None),
                Some((found, reader)) if found == size => return Ok(Some(Box::new(reader))),
                Some((found, _)) => found,
            },
        };
        let e = format!("{key} holds {found} bytes, its metadata says {size}");
        Err(io::Error::new(io::ErrorKind::InvalidData, e).into())
    }

    /// The size of `key`, or `None` if there is no such object.
    pub fn size(&self, key: &str) -> Result<Option<u64>, BlobError> {
        match self {
            Blobs::Local { dir, .. } => match fs::metadata(dir.join(key)) {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            },
            Blobs::S3(s3) => Ok(s3.size(key)?),
        }
    }

    /// Copies object `from` to `to` (replacing it), durably: in a bucket,
    /// a copy made by the store itself.
    pub fn copy(&self, from: &str, to: &str) -> Result<(), BlobError> {
        match self {
            Blobs::Local { dir, tmp } => {
                let mut part = Part::create(tmp)?;
                io::copy(&mut File::open(dir.join(from))?, &mut part.file)?;
                part.file.sync_all()?;
                part.rename(dir.join(to))?;
                sync_dir(dir)?;
                part.keep();
                Ok(())
            }
            Blobs::S3(s3) => Ok(s3.copy(from, to)?),
        }
    }

    /// Deletes `key`; one that is not there is no error.
    pub fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self {
            Blobs::Local { dir, .. } => match fs::remove_file(dir.join(key)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            },
            Blobs::S3(s3) => Ok(s3.delete(key)?),
        }
    }
}

/// A new object being written; committed whole by [`Writer::commit`], or
/// removed (aborted) when dropped before.
pub enum Writer<'a> {
    /// A `.part` file, renamed to `to` on commit.
    Local {
        part: Part,
        to: PathBuf,
        dir: &'a Path,
    },
    /// Parts on their way to the bucket.
    S3(S3Writer<'a>),
}

impl Writer<'_> {
    /// Appends bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        match self {
            Writer::Local { part, .. } => Ok(part.file.write_all(data)?),
            Writer::S3(w) => Ok(w.write(data)?),
        }
    }

    /// Makes the object durable under its key.
    pub fn commit(self) -> Result<(), BlobError> {
        match self {
            Writer::Local { mut part, to, dir } => {
                part.file.sync_all()?;
                part.rename(to)?;
                sync_dir(dir)?;
                part.keep();
                Ok(())
            }
            Writer::S3(w) => Ok(w.commit()?),
        }
    }
}

/// Makes renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, durably: each new directory's
/// name is synced into its parent (an fsync of the new directory alone
/// does not make its name survive a power cut).
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent.unwrap_or(Path::new("."))),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// A file being written under a temporary name; removed on drop unless
/// [`Part::keep`] was called, wherever it has been renamed to by then.
pub struct Part {
    /// Where the file is now.
    path: PathBuf,
    /// Open for writing.
    pub file: File,
    /// Set once committed: drop leaves the file alone.
    kept: bool,
}

impl Part {
    /// A new, empty `<tmp>/<random>.part`.
    pub fn create(tmp: &Path) -> io::Result<Part> {
        let path = tmp.join(format!("{}.part", super::disk::new_id()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Part {
            path,
            file,
            kept: false,
        })
    }

    /// Where the file is now.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file; a later drop removes it at its new place.
    pub fn rename(&mut self, to: PathBuf) -> io::Result<()> {
        fs::rename(&self.path, &to)?;
        self.path = to;
        Ok(())
    }

    /// Leaves the file where it is.
    pub fn keep(mut self) {
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
