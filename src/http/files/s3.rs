//! The bucket of an S3-compatible store (`files_backend = "s3"`).
//!
//! - bytes: `object_store`'s `AmazonS3` (SigV4, retries, streaming) on a
//!   small tokio runtime owned here; tiny_http's handler threads are not
//!   async, so every call is bridged with `Handle::block_on`. Uploads go
//!   up in [`PART`]-sized parts (a multipart upload once the body passes
//!   one part, a single PUT below that), at most [`PARTS_IN_FLIGHT`] at
//!   once; downloads come down as the store's byte stream. Neither is ever
//!   whole in memory.
//! - presigned URLs (`files_direct`): `rusty-s3`, which only signs. It
//!   binds `Content-Length` and `Content-Type` into a PUT URL's signature
//!   (object_store's `Signer::signed_url` signs the host alone, so a client
//!   could store any size and type with it).
//!
//! Keys are `<id>`, `<id>.thumb` and `<id>.upload` (a direct upload's
//! bytes until its completion copies them to `<id>`) at the bucket's root,
//! ids made by tern (32 hex characters); nothing else in the bucket is
//! ever touched.
//!
//! A store that cannot be reached fails fast: 3 s to connect, two retries
//! within 10 s, 30 s without a byte on a transfer. Every such failure is
//! [`StoreDown`], which the files API answers 503.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig, WriteMultipart,
};
use rusty_s3::S3Action;
use tokio::runtime::Runtime;

use crate::config::Config;
use crate::metrics::Metrics;

/// Bytes per part of a multipart upload (S3's smallest part is 5 MiB).
pub const PART: usize = 5 << 20;
/// Parts of one upload sent at once; with the part being filled, an
/// upload holds at most `(PARTS_IN_FLIGHT + 1) * PART` bytes.
const PARTS_IN_FLIGHT: usize = 2;
/// Uploads past [`SMALL`] bytes buffered at once, each holding up to about
/// 20 MiB (a part growing to 8 MiB of capacity, then the parts in flight):
/// so at most about 640 MiB for all of them. More wait for a place, up to
/// [`PLACE_WAIT`], then get 503. Smaller uploads never wait: the HTTP
/// threads bound them.
pub const MAX_LARGE_UPLOADS: usize = 32;
/// Bytes an upload buffers before it needs a place.
const SMALL: usize = 1 << 20;
/// How long an upload waits for a place.
const PLACE_WAIT: Duration = Duration::from_secs(10);

/// The places of [`MAX_LARGE_UPLOADS`].
struct Places {
    free: Mutex<usize>,
    freed: Condvar,
    /// `tern_files_large_uploads`: the places taken.
    metrics: Arc<Metrics>,
}

impl Places {
    /// A place, waiting up to [`PLACE_WAIT`] for one.
    fn take(&self) -> Result<Place<'_>, StoreDown> {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let (mut free, _) = self
            .freed
            .wait_timeout_while(free, PLACE_WAIT, |free| *free == 0)
            .unwrap_or_else(|e| e.into_inner());
        if *free == 0 {
            return Err(StoreDown(format!(
                "{MAX_LARGE_UPLOADS} large uploads to the store already in progress"
            )));
        }
        *free -= 1;
        self.metrics
            .files_large_uploads
            .fetch_add(1, Ordering::Relaxed);
        Ok(Place(self))
    }
}

/// One of [`MAX_LARGE_UPLOADS`], given back when dropped.
struct Place<'a>(&'a Places);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0
            .metrics
            .files_large_uploads
            .fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_one();
    }
}

/// The store could not be reached or refused the request; the message says
/// why (it goes to the log, and a short form to the client).
#[derive(Debug, thiserror::Error)]
#[error("object store: {0}")]
pub struct StoreDown(pub String);

impl From<object_store::Error> for StoreDown {
    fn from(e: object_store::Error) -> StoreDown {
        StoreDown(e.to_string())
    }
}

/// The bucket, the clients that reach it and the runtime they run on.
pub struct S3 {
    /// Two worker threads drive the HTTP connections; callers block on it.
    rt: Runtime,
    /// Moves the bytes.
    store: Arc<AmazonS3>,
    /// Signs presigned URLs.
    bucket: rusty_s3::Bucket,
    /// Static credentials for presigning; `None` when neither the config
    /// nor the environment gives keys (then direct transfers are off).
    credentials: Option<rusty_s3::Credentials>,
    /// Places for large uploads.
    places: Places,
}

impl S3 {
    /// Builds the clients from the `s3_*` keys, with the standard `AWS_*`
    /// environment variables where the config leaves the credentials out.
    /// Nothing is contacted here.
    pub fn open(config: &Config, metrics: Arc<Metrics>) -> io::Result<S3> {
        let bucket = config.s3_bucket.clone().unwrap_or_default();
        let endpoint = config.s3_endpoint.clone();
        let options = ClientOptions::new()
            .with_allow_http(
                endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            )
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(30));
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(&config.s3_region)
            .with_virtual_hosted_style_request(!config.s3_path_style)
            .with_client_options(options)
            .with_retry(retry);
        if let Some(e) = &endpoint {
            builder = builder.with_endpoint(e);
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let key = config
            .s3_access_key
            .clone()
            .or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret = config
            .s3_secret_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        if let Some(k) = &config.s3_access_key {
            builder = builder.with_access_key_id(k);
        }
        if let Some(s) = &config.s3_secret_key {
            builder = builder.with_secret_access_key(s);
        }
        let store = builder.build().map_err(io::Error::other)?;

        let base =
            endpoint.unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.s3_region));
        let style = if config.s3_path_style {
            rusty_s3::UrlStyle::Path
        } else {
            rusty_s3::UrlStyle::VirtualHost
        };
        let url = base
            .parse()
            .map_err(|e| io::Error::other(format!("s3_endpoint {base:?}: {e}")))?;
        let signing = rusty_s3::Bucket::new(url, style, bucket, config.s3_region.clone())
            .map_err(|e| io::Error::other(format!("s3_endpoint {base:?}: {e}")))?;
        let credentials = match (key, secret) {
            (Some(k), Some(s)) => Some(match env("AWS_SESSION_TOKEN") {
                Some(t) if config.s3_access_key.is_none() => {
                    rusty_s3::Credentials::new_with_token(k, s, t)
                }
                _ => rusty_s3::Credentials::new(k, s),
            }),
            _ => None,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tern-s3")
            .enable_all()
            .build()?;
        Ok(S3 {
            rt,
            store: Arc::new(store),
            bucket: signing,
            credentials,
            places: Places {
                free: Mutex::new(MAX_LARGE_UPLOADS),
                freed: Condvar::new(),
                metrics,
            },
        })
    }

    /// Whether presigned URLs can be made (static credentials are known).
    pub fn can_presign(&self) -> bool {
        self.credentials.is_some()
    }

    /// A writer for a new object `key`; nothing is sent before the first
    /// part fills or [`S3Writer::commit`].
    pub fn writer(&self, key: &str) -> S3Writer<'_> {
        S3Writer {
            s3: self,
            key: Key::from(key),
            buf: Vec::new(),
            upload: None,
            place: None,
        }
    }

    /// Stores a small object in one PUT (thumbnails).
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreDown> {
        let key = Key::from(key);
        self.rt
            .block_on(self.store.put(&key, PutPayload::from(bytes)))?;
        Ok(())
    }

    /// The size of object `key`, or `None` if there is none.
    pub fn size(&self, key: &str) -> Result<Option<u64>, StoreDown> {
        match self.rt.block_on(self.store.head(&Key::from(key))) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `len` bytes of object `key` from `start`, as a blocking reader, and
    /// the object's size; `None` if there is no such object.
    pub fn read(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<Option<(u64, ObjectReader)>, StoreDown> {
        let options = GetOptions {
            range: (len > 0).then_some(GetRange::Bounded(start..start + len)),
            ..GetOptions::default()
        };
        let result = match self
            .rt
            .block_on(self.store.get_opts(&Key::from(key), options))
        {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let size = result.meta.size;
        let stream = if len == 0 {
            futures::stream::empty().boxed()
        } else {
            result.into_stream()
        };
        Ok(Some((
            size,
            ObjectReader {
                rt: self.rt.handle().clone(),
                stream,
                chunk: bytes::Bytes::new(),
            },
        )))
    }

    /// Copies object `from` to `to` inside the bucket (the store copies;
    /// no byte comes through tern).
    pub fn copy(&self, from: &str, to: &str) -> Result<(), StoreDown> {
        self.rt
            .block_on(self.store.copy(&Key::from(from), &Key::from(to)))?;
        Ok(())
    }

    /// Deletes object `key`; one that is not there is no error.
    pub fn delete(&self, key: &str) -> Result<(), StoreDown> {
        match self.rt.block_on(self.store.delete(&Key::from(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object in the bucket: key and last-modified time (unix ms).
    /// Used by the sweep, which keeps only what tern made.
    pub fn list(&self) -> Result<Vec<(String, u64)>, StoreDown> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut stream = self.store.list(None);
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                let ms = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
                out.push((meta.location.to_string(), ms));
            }
            Ok(out)
        })
    }

    /// A presigned PUT URL for `key` whose signature covers exactly this
    /// `Content-Length` and `Content-Type`, valid for `ttl`.
    pub fn presign_put(&self, key: &str, size: u64, content_type: &str, ttl: Duration) -> String {
        let mut action = self.bucket.put_object(self.credentials.as_ref(), key);
        action
            .headers_mut()
            .insert("content-length", size.to_string());
        action
            .headers_mut()
            .insert("content-type", content_type.to_owned());
        action.sign(ttl).to_string()
    }

    /// A presigned GET URL for `key`, valid for `ttl`, that makes the store
    /// answer with this `Content-Type` and `Content-Disposition: attachment`.
    pub fn presign_get(&self, key: &str, content_type: &str, ttl: Duration) -> String {
        let mut action = self.bucket.get_object(self.credentials.as_ref(), key);
        action
            .query_mut()
            .insert("response-content-type", content_type.to_owned());
        action
            .query_mut()
            .insert("response-content-disposition", "attachment");
        action.sign(ttl).to_string()
    }
}

/// An object being written: buffered up to one part, then a multipart
/// upload. Dropped before [`S3Writer::commit`], it aborts that upload, so
/// the store keeps nothing.
pub struct S3Writer<'a> {
    s3: &'a S3,
    /// The object's key.
    key: Key,
    /// Bytes not yet handed to an upload (at most one part).
    buf: Vec<u8>,
    /// The multipart upload, once the body passed one part.
    upload: Option<WriteMultipart>,
    /// Its place among the large uploads, once past [`SMALL`] bytes
    /// (given back after the upload is completed or aborted).
    place: Option<Place<'a>>,
}

impl S3Writer<'_> {
    /// Adds bytes; blocks while [`PARTS_IN_FLIGHT`] parts are on their way,
    /// and, past [`SMALL`] bytes, until the upload has a place.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreDown> {
        if self.place.is_none() && self.buf.len() + data.len() > SMALL {
            self.place = Some(self.s3.places.take()?);
        }
        let rt = &self.s3.rt;
        if self.upload.is_none() {
            self.buf.extend_from_slice(data);
            if self.buf.len() <= PART {
                return Ok(());
            }
            let upload = rt.block_on(self.s3.store.put_multipart(&self.key))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let _context = rt.enter();
            writer.write(&std::mem::take(&mut self.buf));
            self.upload = Some(writer);
        } else if let Some(writer) = &mut self.upload {
            let _context = rt.enter();
            writer.write(data);
        }
        if let Some(writer) = &mut self.upload {
            rt.block_on(writer.wait_for_capacity(PARTS_IN_FLIGHT))?;
        }
        Ok(())
    }

    /// Completes the object: it exists, whole, once this returns `Ok`.
    pub fn commit(mut self) -> Result<(), StoreDown> {
        let rt = &self.s3.rt;
        match self.upload.take() {
            Some(writer) => {
                rt.block_on(writer.finish())?;
            }
            None => {
                let body = PutPayload::from(std::mem::take(&mut self.buf));
                rt.block_on(self.s3.store.put(&self.key, body))?;
            }
        }
        Ok(())
    }
}

impl Drop for S3Writer<'_> {
    fn drop(&mut self) {
        if let Some(writer) = self.upload.take() {
            if let Err(e) = self.s3.rt.block_on(writer.abort()) {
                tracing::warn!(key = %self.key, error = %e, "cannot abort multipart upload");
            }
        }
    }
}

/// An object's bytes as a blocking [`Read`]: one chunk of the store's
/// stream at a time.
pub struct ObjectReader {
    /// The runtime the stream's connection lives on.
    rt: tokio::runtime::Handle,
    /// The body, in the chunks the HTTP client hands over.
    stream: BoxStream<'static, object_store::Result<bytes::Bytes>>,
    /// What is left of the current chunk.
    chunk: bytes::Bytes,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        bytes::Buf::advance(&mut self.chunk, n);
        Ok(n)
    }
}
