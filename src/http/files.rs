//! The file server: `/v1/files` (see docs/http-api.md, "Files").
//!
//! The parts, in the order a request meets them:
//!
//! - [`Files::handle`]: method and path → upload (proxied or direct),
//!   completion, download, thumbnail or delete; every other method is 405
//!   and any `{id}` that is not 32 lowercase hex characters is 404 before
//!   the store is touched.
//! - credentials: the admin token, a user token (`Backend::authenticate`), or
//!   for downloads a signed URL ([`sign`]).
//! - [`disk`]: the catalog (metadata, direct uploads in progress, the byte
//!   count behind `max_files_bytes`) and the upload pipeline (stream → hash
//!   → commit → thumbnail → metadata), for both backends.
//! - [`blobs`]: the storage seam: `local` (`<data_dir>/files`) or `s3`
//!   ([`s3`]: a bucket, presigned URLs for direct transfers).
//! - [`thumb`]: image thumbnails, decoded under explicit limits.
//! - [`sweep`]: the thread that applies `files_max_age` and removes
//!   abandoned uploads.
//! - [`range`]: the `Range` header of downloads.
//!
//! Bodies stream both ways in bounded chunks: an upload is read 64 KiB at a
//! time into a `.part` file or 5 MiB parts of a multipart upload, a
//! download is a reader of the file or the object handed to tiny_http with
//! its length. Neither is ever whole in memory.

mod blobs;
mod disk;
mod range;
mod s3;
mod sign;
mod sweep;
mod thumb;

use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiny_http::{Header, Method, Request, Response, StatusCode};

pub(crate) use self::blobs::{create_dir_durable, sync_dir};
use self::blobs::{BlobError, Blobs};
use self::disk::{CompleteError, Disk, Meta, Pending, UploadError, Uploader};
use self::range::Range;
use self::sign::{Signer, Verdict};
use super::Backend;
use super::{bearer, Reply};
use crate::clock::now_ms;
use crate::config::{Config, FilesBackend};
use crate::metrics::Metrics;
use crate::store::Store;

/// Lifetime of the signed URL returned by an upload, seconds (7 days).
const URL_TTL_SECS: u64 = 7 * 24 * 3600;
/// Longest `Content-Type` kept with a file.
const MAX_CONTENT_TYPE: usize = 255;
/// Stored when an upload names no type.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
/// Largest body read as a direct-upload request (`files_direct`); a JSON
/// upload longer than this is a file.
const MAX_DIRECT_REQUEST: u64 = 4096;

/// The files: their catalog and store, and the key that signs their URLs.
pub struct Files {
    /// The catalog, the upload pipeline and the store behind them.
    disk: Disk,
    /// Signs and checks download URLs.
    signer: Signer,
    /// `files_direct`, with a store that can presign.
    direct: bool,
    /// `files_direct_ttl`: life of presigned URLs.
    direct_ttl: Duration,
    /// Counters (uploads, store failures).
    metrics: Arc<Metrics>,
}

/// Who is asking, from a token.
enum Caller {
    /// The admin token.
    Admin,
    /// A user token of this address.
    User(Arc<str>),
}

/// A refusal or failure, sent as the spec's JSON error.
struct Fail {
    /// HTTP status, 4xx or 5xx.
    status: u16,
    /// The `error` field: a snake_case code from the spec.
    code: &'static str,
    /// The `message` field, for people.
    message: String,
    /// Extra headers (`Allow`, `Content-Range`).
    headers: Vec<Header>,
}

impl Fail {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    fn not_found() -> Fail {
        Fail::new(404, "not_found", "no such file")
    }

    fn unauthorized(message: &str) -> Fail {
        Fail::new(401, "unauthorized", message)
    }

    fn forbidden(message: &str) -> Fail {
        Fail::new(403, "forbidden", message)
    }

    fn not_allowed(allow: &str) -> Fail {
        let mut fail = Fail::new(405, "method_not_allowed", "method not allowed on this path");
        fail.headers.extend(header("Allow", allow));
        fail
    }

    /// A server-side failure: logged, answered 500 without details.
    fn internal(what: &str, e: &dyn std::fmt::Display) -> Fail {
        tracing::error!(error = %e, "{what}");
        Fail::new(500, "internal", "file store error")
    }

    /// The object store failed: logged, answered 503 so clients retry.
    fn unavailable(what: &str, e: &dyn std::fmt::Display) -> Fail {
        tracing::warn!(error = %e, "{what}");
        let mut fail = Fail::new(
            503,
            "store_unavailable",
            "the file store is unavailable; retry later",
        );
        fail.headers.extend(header("Retry-After", "5"));
        fail
    }

    /// A [`BlobError`]: 503 for the object store, 500 for the disk.
    fn blob(what: &str, e: BlobError) -> Fail {
        match e {
            BlobError::Down(e) => Fail::unavailable(what, &e),
            BlobError::Io(e) => Fail::internal(what, &e),
        }
    }

    fn send(self, request: Request) {
        let reply = Reply::error(self.status, self.code, self.message);
        send_reply(request, reply, self.headers);
    }
}

/// The answer to a successful upload.
#[derive(Serialize)]
struct Uploaded<'a> {
    /// The new file's id.
    id: &'a str,
    /// Signed download path and query, valid for [`URL_TTL_SECS`].
    url: String,
    /// Bytes stored.
    size: u64,
    /// SHA-256 of the bytes, lowercase hex (the ETag of downloads).
    sha256: &'a str,
    /// The type downloads will carry.
    content_type: &'a str,
    /// Signed path and query of the thumbnail, for images that got one.
    #[serde(skip_serializing_if = "Option::is_none")]
    thumbnail: Option<String>,
}

/// The body of a direct-upload request (`files_direct`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectRequest {
    /// Must be `true`.
    direct: bool,
    /// The file's exact size, bytes.
    size: u64,
    /// The type to store; default `application/octet-stream`.
    #[serde(default)]
    content_type: Option<String>,
    /// The SHA-256 the stored bytes must have (lowercase hex), if given.
    #[serde(default)]
    sha256: Option<String>,
}

/// The answer to a direct-upload request.
#[derive(Serialize)]
struct DirectAnswer<'a> {
    /// The new file's id (for `POST /v1/files/{id}/complete`).
    id: &'a str,
    /// The presigned URL to PUT the bytes to.
    upload_url: String,
    /// When `upload_url` stops working, unix seconds.
    expires: u64,
    /// Always `PUT`.
    method: &'static str,
    /// Headers the PUT must carry exactly (the signature covers them, and
    /// `Content-Length`, which clients set themselves).
    headers: std::collections::BTreeMap<&'static str, String>,
}

impl Files {
    /// Opens (creating) the file catalog, its store and its signing key;
    /// removes what interrupted uploads left behind. Errors name the path
    /// or key they concern. The store itself is not contacted.
    pub fn open(config: &Config, metrics: Arc<Metrics>, store: Arc<Store>) -> io::Result<Files> {
        let in_path = |path: &Path| {
            let path = path.display().to_string();
            move |e: io::Error| io::Error::new(e.kind(), format!("{path}: {e}"))
        };
        let dir = config.data_dir.join("files");
        let blobs = match config.files_backend {
            FilesBackend::Local => Blobs::Local {
                dir: dir.clone(),
                tmp: dir.join("tmp"),
            },
            FilesBackend::S3 => {
                Blobs::S3(Box::new(s3::S3::open(config, metrics.clone()).map_err(
                    |e| io::Error::new(e.kind(), format!("files_backend = \"s3\": {e}")),
                )?))
            }
        };
        let direct = config.files_direct && blobs.s3().is_some_and(|s3| s3.can_presign());
        if config.files_direct && !direct {
            return Err(io::Error::other(
                "files_direct needs static credentials to presign URLs: set s3_access_key \
                 and s3_secret_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            ));
        }
        let mut disk = Disk::open(
            &dir,
            blobs,
            config.max_file_size,
            config.max_files_bytes,
            metrics.clone(),
        )
        .map_err(in_path(&dir))?;
        disk.keep_free(store);
        let secret = config.data_dir.join("files.secret");
        let signer = Signer::open(&secret).map_err(in_path(&secret))?;
        Ok(Files {
            disk,
            signer,
            direct,
            direct_ttl: Duration::from_secs(u64::from(config.files_direct_ttl)),
            metrics,
        })
    }

    /// Starts the retention sweep of `files` (a thread that ends once the
    /// files are dropped).
    pub fn start_sweep(files: &Arc<Files>, config: &Config) -> io::Result<()> {
        sweep::start(Arc::downgrade(files), config)
    }

    /// Serves one request under `/v1/files`; `admin` says whether the admin
    /// token was presented. The body has not been read.
    pub fn handle(&self, core: &Backend, admin: bool, request: Request) {
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let method = request.method().clone();
        if path == "/v1/files" {
            return match method {
                Method::Post => self.upload(core, admin, request),
                _ => Fail::not_allowed("POST").send(request),
            };
        }
        let Some(rest) = path.strip_prefix("/v1/files/") else {
            return Fail::not_found().send(request);
        };
        let (id, action) = match rest.split_once('/') {
            Some((id, action @ ("thumbnail" | "complete"))) => (id, Some(action)),
            Some(_) => return Fail::not_found().send(request),
            None => (rest, None),
        };
        let allowed = match action {
            None => "GET, HEAD, DELETE",
            Some("thumbnail") => "GET, HEAD",
            Some(_) => "POST",
        };
        let method_fits = match action {
            None => matches!(method, Method::Get | Method::Head | Method::Delete),
            Some("thumbnail") => matches!(method, Method::Get | Method::Head),
            Some(_) => method == Method::Post,
        };
        if !method_fits {
            return Fail::not_allowed(allowed).send(request);
        }
        if !disk::is_id(id) {
            return Fail::not_found().send(request);
        }
        let result = match (action, &method) {
            (Some("complete"), _) => self.complete(core, admin, &request, id),
            (Some(_), _) => self.thumbnail(core, admin, &request, id, query),
            (None, Method::Delete) => self.delete(core, admin, &request, id),
            (None, _) => self.download(core, admin, &request, id, query),
        };
        match result {
            Ok(answer) => answer.send(request),
            Err(fail) => fail.send(request),
        }
    }

    /// `POST /v1/files`: a proxied upload, or with `files_direct` a JSON
    /// direct-upload request.
    fn upload(&self, core: &Backend, admin: bool, mut request: Request) {
        let caller = match caller(core, admin, &request) {
            Ok(Some(caller)) => caller,
            Ok(None) => {
                return Fail::unauthorized("a user or admin token is required").send(request)
            }
            Err(fail) => return fail.send(request),
        };
        let content_type = match content_type(&request) {
            Ok(t) => t,
            Err(fail) => return fail.send(request),
        };
        // A length is required: tiny_http's chunked decoder reports a body
        // cut off inside a chunk as a clean end, which would store a
        // truncated file as complete.
        let Some(announced) = request.body_length().map(|n| n as u64) else {
            return Fail::new(411, "length_required", "uploads need a Content-Length")
                .send(request);
        };
        let uploader = match &caller {
            Caller::Admin => Uploader::Admin,
            Caller::User(address) => Uploader::User(address.to_string()),
        };
        // A direct-upload request is a small JSON body; any other JSON is a
        // file, uploaded from the bytes already read.
        let mut head = Vec::new();
        if self.direct && is_json(&content_type) && announced <= MAX_DIRECT_REQUEST {
            let read = super::MinRate::new(request.as_reader())
                .take(MAX_DIRECT_REQUEST)
                .read_to_end(&mut head);
            if let Err(e) = read {
                return upload_failure(UploadError::Body(e)).send(request);
            }
            if let Ok(direct) = serde_json::from_slice::<DirectRequest>(&head) {
                if direct.direct {
                    let answer = self.announce(direct, uploader);
                    return match answer {
                        Ok(reply) => send_reply(request, reply, Vec::new()),
                        Err(fail) => fail.send(request),
                    };
                }
            }
        } else if let Err(e) = self.disk.admit(announced) {
            // Refused before `as_reader`, so no `100 Continue` goes out for
            // a body that would be refused anyway.
            return upload_failure(e).send(request);
        }
        let now = now_ms();
        let mut body = io::Cursor::new(head).chain(super::MinRate::new(request.as_reader()));
        let stored = self
            .disk
            .upload(&mut body, announced, content_type, uploader, now);
        let (id, meta) = match stored {
            Ok(stored) => stored,
            Err(e) => {
                if matches!(e, UploadError::Down(_)) {
                    self.metrics
                        .files_store_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                return upload_failure(e).send(request);
            }
        };
        tracing::debug!(%id, size = meta.size, "file stored");
        core.metrics.files_stored.fetch_add(1, Ordering::Relaxed);
        send_reply(request, self.uploaded(&id, &meta, now), Vec::new());
    }

    /// The 201 answer describing stored file `id`.
    fn uploaded(&self, id: &str, meta: &Meta, now: u64) -> Reply {
        let exp = now / 1000 + URL_TTL_SECS;
        let body = Uploaded {
            id,
            url: self.signer.url(id, exp),
            size: meta.size,
            sha256: &meta.sha256,
            content_type: &meta.content_type,
            thumbnail: meta.thumbnail.map(|_| self.signer.thumbnail_url(id, exp)),
        };
        Reply::json(201, &body)
    }

    /// A direct upload: records it and answers its presigned PUT URL.
    fn announce(&self, direct: DirectRequest, uploader: Uploader) -> Result<Reply, Fail> {
        let content_type = match direct.content_type.as_deref().map(str::trim) {
            None | Some("") => DEFAULT_CONTENT_TYPE.to_owned(),
            Some(t) => check_content_type(t)?.to_owned(),
        };
        if let Some(sha) = &direct.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Fail::new(
                    400,
                    "bad_request",
                    "sha256 must be 64 hex characters",
                ));
            }
        }
        let now = now_ms();
        let expires_ms = now + self.direct_ttl.as_millis() as u64;
        let pending = Pending {
            size: direct.size,
            content_type,
            sha256: direct.sha256.map(|s| s.to_ascii_lowercase()),
            uploader,
            created_ms: now,
            expires_ms,
            staged: true,
        };
        let id = self.disk.announce(&pending).map_err(upload_failure)?;
        let Some(s3) = self.disk.blobs().s3() else {
            return Err(Fail::internal("direct upload", &"no object store"));
        };
        let upload_url = s3.presign_put(
            &pending.upload_key(&id),
            pending.size,
            &pending.content_type,
            self.direct_ttl,
        );
        tracing::debug!(%id, size = pending.size, "direct upload announced");
        let answer = DirectAnswer {
            id: &id,
            upload_url,
            expires: expires_ms / 1000,
            method: "PUT",
            headers: [("Content-Type", pending.content_type.clone())].into(),
        };
        Ok(Reply::json(201, &answer))
    }

    /// `POST /v1/files/{id}/complete`: the uploader (or the admin) says the
    /// bytes are in the store.
    fn complete(
        &self,
        core: &Backend,
        admin: bool,
        request: &Request,
        id: &str,
    ) -> Result<Answer, Fail> {
        let caller = caller(core, admin, request)?
            .ok_or_else(|| Fail::unauthorized("a user or admin token is required"))?;
        let owner = match self.disk.pending(id) {
            Ok(Some(p)) => p.uploader,
            Ok(None) => match self.disk.meta(id) {
                Ok(Some(meta)) => meta.uploader,
                Ok(None) => return Err(Fail::not_found()),
                Err(e) => return Err(Fail::internal("reading file metadata failed", &e)),
            },
            Err(e) => return Err(Fail::internal("reading a direct upload failed", &e)),
        };
        if !may_change(&caller, &owner) {
            return Err(Fail::forbidden(
                "only the uploader or the admin may complete an upload",
            ));
        }
        let now = now_ms();
        let (meta, new) = self.disk.complete(id, now).map_err(|e| match e {
            CompleteError::NotFound => Fail::not_found(),
            CompleteError::NotUploaded => Fail::new(409, "not_uploaded", e.to_string()),
            CompleteError::Busy => Fail::new(503, "unavailable", e.to_string()),
            CompleteError::Mismatch(why) => {
                Fail::new(400, "bad_request", format!("upload refused: {why}"))
            }
            CompleteError::Store(UploadError::Down(e)) => {
                self.metrics
                    .files_store_errors
                    .fetch_add(1, Ordering::Relaxed);
                Fail::unavailable("completing a direct upload failed", &e)
            }
            CompleteError::Store(e) => upload_failure(e),
        })?;
        if new {
            tracing::debug!(%id, size = meta.size, "direct upload completed");
            core.metrics.files_stored.fetch_add(1, Ordering::Relaxed);
        }
        let reply = self.uploaded(id, &meta, now);
        let headers: Vec<Header> = header("Content-Type", reply.content_type)
            .into_iter()
            .collect();
        let len = reply.body.len() as u64;
        Ok(Answer::new(
            reply.status,
            headers,
            Some(Box::new(io::Cursor::new(reply.body))),
            len,
        ))
    }

    /// Checks the credentials of a download of `subject` (a file id, or a
    /// thumbnail's [`sign::thumbnail_subject`]): a valid token, else a
    /// signed URL, else 401.
    fn authorize(
        &self,
        core: &Backend,
        admin: bool,
        request: &Request,
        subject: &str,
        query: &str,
    ) -> Result<(), Fail> {
        let token = caller(core, admin, request);
        if matches!(token, Ok(Some(_))) {
            return Ok(());
        }
        match self.signer.verify(subject, query, now_ms() / 1000) {
            Verdict::Valid => Ok(()),
            Verdict::BadSignature => Err(Fail::forbidden("bad URL signature")),
            Verdict::Expired => Err(Fail::forbidden("URL expired")),
            Verdict::Absent => {
                token?;
                Err(Fail::unauthorized(
                    "a user or admin token, or a signed URL, is required",
                ))
            }
        }
    }

    /// The metadata of file `id`, or 404.
    fn meta(&self, id: &str) -> Result<Meta, Fail> {
        self.disk
            .meta(id)
            .map_err(|e| Fail::internal("reading file metadata failed", &e))?
            .ok_or_else(Fail::not_found)
    }

    /// `GET` and `HEAD /v1/files/{id}`.
    fn download(
        &self,
        core: &Backend,
        admin: bool,
        request: &Request,
        id: &str,
        query: &str,
    ) -> Result<Answer, Fail> {
        self.authorize(core, admin, request, id, query)?;
        let meta = self.meta(id)?;

        let etag = format!("\"{}\"", meta.sha256);
        let mut headers: Vec<Header> = [
            ("Content-Type", meta.content_type.as_str()),
            ("ETag", etag.as_str()),
            ("Accept-Ranges", "bytes"),
            // The type is the uploader's word: never let a browser guess
            // better, nor render a file as a page of this origin.
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Disposition", "attachment"),
        ]
        .into_iter()
        .filter_map(|(k, v)| header(k, v))
        .collect();

        if request_header(request, "If-None-Match").is_some_and(|v| etag_matches(v, &etag)) {
            // Content-Length as for a 200; tiny_http sends no body with 304.
            return Ok(Answer::new(304, headers, None, meta.size));
        }
        let head = *request.method() == Method::Head;
        if self.direct && !head {
            // Authorized: the store serves the bytes (and any Range).
            let Some(s3) = self.disk.blobs().s3() else {
                return Err(Fail::internal("direct download", &"no object store"));
            };
            let location = s3.presign_get(id, &meta.content_type, self.direct_ttl);
            let mut headers: Vec<Header> = Vec::new();
            headers.extend(header("Location", &location));
            headers.extend(header("Cache-Control", "no-store"));
            return Ok(Answer::new(302, headers, None, 0));
        }
        // `If-Range` with another validator: the file changed, send it whole.
        let range = match request_header(request, "If-Range") {
            Some(v) if v.trim() != etag => Range::Full,
            _ => Range::parse(request_header(request, "Range"), meta.size),
        };
        let (status, start, len) = match range {
            Range::Full => (200, 0, meta.size),
            Range::Part { start, end } => {
                let range = format!("bytes {start}-{end}/{}", meta.size);
                headers.extend(header("Content-Range", &range));
                (206, start, end - start + 1)
            }
            Range::Unsatisfiable => {
                let mut fail = Fail::new(
                    416,
                    "range_not_satisfiable",
                    format!("the file has {} bytes", meta.size),
                );
                fail.headers
                    .extend(header("Content-Range", &format!("bytes */{}", meta.size)));
                return Err(fail);
            }
        };
        if head {
            return Ok(Answer::new(status, headers, None, len));
        }
        let body = self.read(id, meta.size, start, len)?;
        Ok(Answer::new(status, headers, Some(body), len))
    }

    /// `len` bytes of `key` from `start`; 404 when gone, 503 when the
    /// store is down.
    fn read(
        &self,
        key: &str,
        size: u64,
        start: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, Fail> {
        match self.disk.blobs().open(key, size, start, len) {
            Ok(Some(body)) => Ok(body),
            Ok(None) => Err(Fail::not_found()),
            Err(e) => {
                if matches!(e, BlobError::Down(_)) {
                    self.metrics
                        .files_store_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(Fail::blob("reading file failed", e))
            }
        }
    }

    /// `GET` and `HEAD /v1/files/{id}/thumbnail`.
    fn thumbnail(
        &self,
        core: &Backend,
        admin: bool,
        request: &Request,
        id: &str,
        query: &str,
    ) -> Result<Answer, Fail> {
        self.authorize(core, admin, request, &sign::thumbnail_subject(id), query)?;
        let meta = self.meta(id)?;
        let Some(size) = meta.thumbnail else {
            return Err(Fail::new(404, "not_found", "this file has no thumbnail"));
        };
        let etag = format!("\"{}-thumb\"", meta.sha256);
        let headers: Vec<Header> = [
            ("Content-Type", thumb::CONTENT_TYPE),
            ("ETag", etag.as_str()),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "private, max-age=86400"),
        ]
        .into_iter()
        .filter_map(|(k, v)| header(k, v))
        .collect();
        if request_header(request, "If-None-Match").is_some_and(|v| etag_matches(v, &etag)) {
            return Ok(Answer::new(304, headers, None, size));
        }
        if *request.method() == Method::Head {
            return Ok(Answer::new(200, headers, None, size));
        }
        let body = self.read(&disk::thumb_key(id), size, 0, size)?;
        Ok(Answer::new(200, headers, Some(body), size))
    }

    /// `DELETE /v1/files/{id}`: the uploader or the admin.
    fn delete(
        &self,
        core: &Backend,
        admin: bool,
        request: &Request,
        id: &str,
    ) -> Result<Answer, Fail> {
        let caller = caller(core, admin, request)?
            .ok_or_else(|| Fail::unauthorized("a user or admin token is required"))?;
        let meta = self.meta(id)?;
        if !may_change(&caller, &meta.uploader) {
            return Err(Fail::forbidden(
                "only the uploader or the admin may delete a file",
            ));
        }
        match self.disk.delete(id, &meta) {
            Ok(true) => {
                tracing::debug!(%id, "file deleted");
                Ok(Answer::new(204, Vec::new(), None, 0))
            }
            Ok(false) => Err(Fail::not_found()),
            Err(e) => Err(Fail::internal("deleting file failed", &e)),
        }
    }
}

/// Whether `caller` may delete or complete what `owner` uploaded.
fn may_change(caller: &Caller, owner: &Uploader) -> bool {
    match (caller, owner) {
        (Caller::Admin, _) => true,
        (Caller::User(a), Uploader::User(b)) => **a == **b,
        (Caller::User(_), Uploader::Admin) => false,
    }
}

/// Whether a `Content-Type` is JSON (`application/json`, any parameters).
fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// A successful answer whose body, if any, is (part of) a stored file.
struct Answer {
    /// 200, 201, 206, 302, 304 or 204.
    status: u16,
    /// Everything but `Content-Length`, which tiny_http adds from `len`.
    headers: Vec<Header>,
    /// The bytes to send, exactly `len` of them; `None`: no body.
    file: Option<Box<dyn Read + Send>>,
    /// The `Content-Length`.
    len: u64,
}

impl Answer {
    fn new(
        status: u16,
        headers: Vec<Header>,
        file: Option<Box<dyn Read + Send>>,
        len: u64,
    ) -> Answer {
        Answer {
            status,
            headers,
            file,
            len,
        }
    }

    fn send(self, request: Request) {
        match self.file {
            Some(file) => send(request, self.status, self.headers, file, self.len),
            None => send(request, self.status, self.headers, io::empty(), self.len),
        }
    }
}

/// Sends a JSON [`Reply`] with extra headers.
fn send_reply(request: Request, reply: Reply, mut headers: Vec<Header>) {
    headers.extend(header("Content-Type", reply.content_type));
    let len = reply.body.len() as u64;
    send(
        request,
        reply.status,
        headers,
        io::Cursor::new(reply.body),
        len,
    );
}

/// Sends `body`, `len` bytes, with `Content-Length` (never chunked: clients
/// need the length for progress and ranges). tiny_http leaves the body out
/// for HEAD, 204 and 304.
fn send<R: Read>(request: Request, status: u16, headers: Vec<Header>, body: R, len: u64) {
    let Ok(len) = usize::try_from(len) else {
        return Fail::new(500, "internal", "file too large for this platform").send(request);
    };
    let body = super::MinRate::response(body);
    let response = Response::new(StatusCode(status), headers, body, Some(len), None)
        .with_chunked_threshold(usize::MAX);
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "file response failed");
    }
}

/// The caller named by the request's token: `Ok(None)` without one, 401 for
/// a token that is unknown or expired.
fn caller(core: &Backend, admin: bool, request: &Request) -> Result<Option<Caller>, Fail> {
    if admin {
        return Ok(Some(Caller::Admin));
    }
    let Some(token) = bearer(request) else {
        return Ok(None);
    };
    match core.authenticate(&token) {
        Ok(Some(user)) => Ok(Some(Caller::User(user.address.clone()))),
        Ok(None) => Err(Fail::unauthorized("unknown or expired token")),
        Err(e) => Err(Fail::internal("token lookup failed", &e)),
    }
}

/// The upload's `Content-Type`: printable ASCII, at most 255 bytes; the
/// default when absent or empty.
fn content_type(request: &Request) -> Result<String, Fail> {
    let value = request_header(request, "Content-Type").map_or("", str::trim);
    if value.is_empty() {
        return Ok(DEFAULT_CONTENT_TYPE.to_owned());
    }
    check_content_type(value).map(str::to_owned)
}

/// A `Content-Type` as stored: printable ASCII, at most 255 bytes.
fn check_content_type(value: &str) -> Result<&str, Fail> {
    if value.len() > MAX_CONTENT_TYPE {
        return Err(Fail::new(
            400,
            "bad_request",
            format!("Content-Type longer than {MAX_CONTENT_TYPE} bytes"),
        ));
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Fail::new(
            400,
            "bad_request",
            "Content-Type must be printable ASCII",
        ));
    }
    Ok(value)
}

/// The answer to a refused or failed upload.
fn upload_failure(e: UploadError) -> Fail {
    match e {
        UploadError::TooLarge { .. } => Fail::new(413, "payload_too_large", e.to_string()),
        UploadError::Quota { .. } | UploadError::NoSpace { .. } => {
            Fail::new(507, "insufficient_storage", e.to_string())
        }
        UploadError::Truncated { .. } | UploadError::Body(_) => {
            tracing::debug!(error = %e, "upload abandoned");
            Fail::new(400, "bad_request", e.to_string())
        }
        UploadError::Io(ref io) if io.kind() == io::ErrorKind::StorageFull => {
            tracing::warn!(error = %e, "file store disk full");
            Fail::new(507, "insufficient_storage", "no space left for files")
        }
        UploadError::Io(e) => Fail::internal("storing upload failed", &e),
        UploadError::Down(e) => Fail::unavailable("storing upload failed", &e),
    }
}

/// Whether an `If-None-Match` value names `etag` (weak or strong) or is `*`.
fn etag_matches(value: &str, etag: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

/// The value of the first header named `name`.
fn request_header<'r>(request: &'r Request, name: &'static str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// A response header; `None` (left out) if the value is not valid ASCII,
/// which the values built here always are.
fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::etag_matches;

    #[test]
    fn if_none_match() {
        let etag = "\"abc\"";
        assert!(etag_matches("\"abc\"", etag));
        assert!(etag_matches("W/\"abc\"", etag));
        assert!(etag_matches("\"x\", \"abc\"", etag));
        assert!(etag_matches("*", etag));
        assert!(!etag_matches("\"abcd\"", etag));
        assert!(!etag_matches("abc", etag));
        assert!(!etag_matches("", etag));
    }
}
