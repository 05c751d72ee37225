//! The built-in file server: `/v1/files` (see docs/http-api.md, "Files").
//!
//! The parts, in the order a request meets them:
//!
//! - [`Files::handle`]: method and path → upload, download or delete; every
//!   other method is 405 and any `{id}` that is not 32 lowercase hex
//!   characters is 404 before the file system is touched.
//! - credentials: the admin token, a user token (`Backend::authenticate`), or
//!   for downloads a signed URL ([`sign`]).
//! - [`disk`]: the directory of files, the upload pipeline (stream → hash →
//!   fsync → rename) and the byte count behind `max_files_bytes`.
//! - [`range`]: the `Range` header of downloads.
//!
//! Bodies stream both ways in bounded chunks: an upload is read 64 KiB at a
//! time into a `.part` file, a download is a `Take<File>` handed to
//! tiny_http with its length. Neither is ever whole in memory.

mod disk;
mod range;
mod sign;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;
use tiny_http::{Header, Method, Request, Response, StatusCode};

use self::disk::{Disk, Meta, UploadError, Uploader};
use self::range::Range;
use self::sign::{Signer, Verdict};
use super::Backend;
use super::{bearer, Reply};
use crate::clock::now_ms;
use crate::config::Config;

/// Lifetime of the signed URL returned by an upload, seconds (7 days).
const URL_TTL_SECS: u64 = 7 * 24 * 3600;
/// Longest `Content-Type` kept with a file.
const MAX_CONTENT_TYPE: usize = 255;
/// Stored when an upload names no type.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// The file store under `<data_dir>/files/` and the key that signs its URLs.
pub struct Files {
    /// Stored files and the upload pipeline.
    disk: Disk,
    /// Signs and checks download URLs.
    signer: Signer,
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
}

impl Files {
    /// Opens (creating) the file store and its signing key; removes what
    /// interrupted uploads left behind. Errors name the path they concern.
    pub fn open(config: &Config) -> io::Result<Files> {
        let in_path = |path: &Path| {
            let path = path.display().to_string();
            move |e: io::Error| io::Error::new(e.kind(), format!("{path}: {e}"))
        };
        let dir = config.data_dir.join("files");
        let disk = Disk::open(&dir, config.max_file_size, config.max_files_bytes)
            .map_err(in_path(&dir))?;
        let secret = config.data_dir.join("files.secret");
        let signer = Signer::open(&secret).map_err(in_path(&secret))?;
        Ok(Files { disk, signer })
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
        let Some(id) = path.strip_prefix("/v1/files/") else {
            return Fail::not_found().send(request);
        };
        if !matches!(method, Method::Get | Method::Head | Method::Delete) {
            return Fail::not_allowed("GET, HEAD, DELETE").send(request);
        }
        if !disk::is_id(id) {
            return Fail::not_found().send(request);
        }
        let result = match method {
            Method::Delete => self.delete(core, admin, &request, id),
            _ => self.download(core, admin, &request, id, query),
        };
        match result {
            Ok(answer) => answer.send(request),
            Err(fail) => fail.send(request),
        }
    }

    /// `POST /v1/files`.
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
        // Refused before `as_reader`, so no `100 Continue` goes out for a
        // body that would be refused anyway.
        if let Err(e) = self.disk.admit(announced) {
            return upload_failure(e).send(request);
        }
        let uploader = match &caller {
            Caller::Admin => Uploader::Admin,
            Caller::User(address) => Uploader::User(address.to_string()),
        };
        let now = now_ms();
        let stored = self.disk.upload(
            &mut super::MinRate::new(request.as_reader()),
            announced,
            content_type,
            uploader,
            now,
        );
        let (id, meta) = match stored {
            Ok(stored) => stored,
            Err(e) => return upload_failure(e).send(request),
        };
        tracing::debug!(%id, size = meta.size, "file stored");
        core.metrics.files_stored.fetch_add(1, Ordering::Relaxed);
        let body = Uploaded {
            id: &id,
            url: self.signer.url(&id, now / 1000 + URL_TTL_SECS),
            size: meta.size,
            sha256: &meta.sha256,
            content_type: &meta.content_type,
        };
        send_reply(request, Reply::json(201, &body), Vec::new());
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
        // A valid token is enough; otherwise a signed URL; otherwise 401.
        let token = caller(core, admin, request);
        if !matches!(token, Ok(Some(_))) {
            match self.signer.verify(id, query, now_ms() / 1000) {
                Verdict::Valid => {}
                Verdict::BadSignature => return Err(Fail::forbidden("bad URL signature")),
                Verdict::Expired => return Err(Fail::forbidden("URL expired")),
                Verdict::Absent => {
                    token?;
                    return Err(Fail::unauthorized(
                        "a user or admin token, or a signed URL, is required",
                    ));
                }
            }
        }
        let meta = self
            .disk
            .meta(id)
            .map_err(|e| Fail::internal("reading file metadata failed", &e))?
            .ok_or_else(Fail::not_found)?;
        let mut file = self
            .disk
            .open_data(id)
            .map_err(|e| Fail::internal("opening file failed", &e))?
            .ok_or_else(Fail::not_found)?;
        let size = file
            .metadata()
            .map_err(|e| Fail::internal("reading file size failed", &e))?
            .len();
        if size != meta.size {
            let e = format!("{id} holds {size} bytes, its metadata says {}", meta.size);
            return Err(Fail::internal("file store inconsistent", &e));
        }

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
        // `If-Range` with another validator: the file changed, send it whole.
        let range = match request_header(request, "If-Range") {
            Some(v) if v.trim() != etag => Range::Full,
            _ => Range::parse(request_header(request, "Range"), meta.size),
        };
        match range {
            Range::Full => Ok(Answer::new(200, headers, Some(file), meta.size)),
            Range::Part { start, end } => {
                file.seek(SeekFrom::Start(start))
                    .map_err(|e| Fail::internal("seeking file failed", &e))?;
                let range = format!("bytes {start}-{end}/{}", meta.size);
                headers.extend(header("Content-Range", &range));
                Ok(Answer::new(206, headers, Some(file), end - start + 1))
            }
            Range::Unsatisfiable => {
                let mut fail = Fail::new(
                    416,
                    "range_not_satisfiable",
                    format!("the file has {} bytes", meta.size),
                );
                fail.headers
                    .extend(header("Content-Range", &format!("bytes */{}", meta.size)));
                Err(fail)
            }
        }
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
        let meta: Meta = self
            .disk
            .meta(id)
            .map_err(|e| Fail::internal("reading file metadata failed", &e))?
            .ok_or_else(Fail::not_found)?;
        let allowed = match (&caller, &meta.uploader) {
            (Caller::Admin, _) => true,
            (Caller::User(a), Uploader::User(b)) => **a == **b,
            (Caller::User(_), Uploader::Admin) => false,
        };
        if !allowed {
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

/// A successful answer whose body, if any, is (part of) a stored file.
struct Answer {
    /// 200, 206, 304 or 204.
    status: u16,
    /// Everything but `Content-Length`, which tiny_http adds from `len`.
    headers: Vec<Header>,
    /// Positioned at the first byte to send; `None`: no body.
    file: Option<File>,
    /// The `Content-Length`.
    len: u64,
}

impl Answer {
    fn new(status: u16, headers: Vec<Header>, file: Option<File>, len: u64) -> Answer {
        Answer {
            status,
            headers,
            file,
            len,
        }
    }

    fn send(self, request: Request) {
        match self.file {
            Some(file) => send(
                request,
                self.status,
                self.headers,
                file.take(self.len),
                self.len,
            ),
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
    Ok(value.to_owned())
}

/// The answer to a refused or failed upload.
fn upload_failure(e: UploadError) -> Fail {
    match e {
        UploadError::TooLarge { .. } => Fail::new(413, "payload_too_large", e.to_string()),
        UploadError::Quota { .. } => Fail::new(507, "insufficient_storage", e.to_string()),
        UploadError::Truncated { .. } | UploadError::Body(_) => {
            tracing::debug!(error = %e, "upload abandoned");
            Fail::new(400, "bad_request", e.to_string())
        }
        UploadError::Io(ref io) if io.kind() == io::ErrorKind::StorageFull => {
            tracing::warn!(error = %e, "file store disk full");
            Fail::new(507, "insufficient_storage", "no space left for files")
        }
        UploadError::Io(e) => Fail::internal("storing upload failed", &e),
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
