//! The file server (`/v1/files`): uploads streamed from generated data (1 byte
//! to 1 GiB) and byte-identical downloads, ranges, signed URLs, the size
//! limit and the quota, cut-off uploads, hostile ids, and who may do what.
//!
//! Every test runs on both backends (`files::local::*`, `files::s3::*`, the
//! latter against a real moto server on loopback, see `s3.rs`); the tests
//! only the s3 backend has (direct transfers, outages) are in
//! `files_s3.rs`, retention and thumbnails in `files_more.rs`.
//!
//! Bodies are generated and hashed on the fly ([`Noise`]) and the HTTP client
//! (`util::request`) streams both ways, so no test holds a large file in memory either.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::s3::Moto;
use crate::util::{
    http, now_ms, raw_request, read_head, read_resp, request, scrape, vm_rss_kib, wait_for, Resp,
    TestServer, ADMIN,
};

pub const MIB: u64 = 1024 * 1024;

/// Where a test server keeps its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `<data_dir>/files`.
    Local,
    /// A bucket of a moto server.
    S3,
}

/// A test server on one backend, with its moto when s3 (stopped after
/// the server, on drop).
pub struct Setup {
    pub server: TestServer,
    pub moto: Option<Moto>,
}

impl std::ops::Deref for Setup {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl std::ops::DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut TestServer {
        &mut self.server
    }
}

/// Starts moto (for s3) and a server on `dir` with `args` on `backend`.
pub fn start(backend: Backend, dir: &Path, args: &[&str]) -> Setup {
    let moto = (backend == Backend::S3).then(|| Moto::start(dir));
    let mut all: Vec<String> = moto.as_ref().map(Moto::args).unwrap_or_default();
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let server = TestServer::start_with(dir, &all);
    Setup { server, moto }
}

/// The size of file `id`'s bytes where the backend keeps them.
pub fn stored_size(setup: &Setup, id: &str) -> Option<u64> {
    match &setup.moto {
        Some(moto) => moto.size(id),
        None => std::fs::metadata(setup.dir.join("files").join(id))
            .ok()
            .map(|m| m.len()),
    }
}

/// Runs each listed test (a `fn(Backend)`) on both backends, as
/// `files::local::<name>` and `files::s3::<name>`.
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod local {
            $(#[test] fn $name() { super::$name(super::Backend::Local) })+
        }
        mod s3 {
            $(#[test] fn $name() { super::$name(super::Backend::S3) })+
        }
    };
}
pub(crate) use on_both_backends;

on_both_backends!(
    small_and_10_mib_files_round_trip,
    range_requests,
    signed_urls,
    one_gib_upload_and_download_stream_with_flat_rss,
    over_the_size_limit_nothing_is_kept,
    uploads_need_a_content_length,
    quota_counts_stored_bytes,
    concurrent_uploads_share_the_quota,
    cut_off_upload_leaves_nothing,
    hostile_ids_never_reach_the_file_system,
    who_may_do_what,
    huge_announced_length_does_not_kill_the_server,
);

/// `len` pseudo-random bytes, each a function of its offset and `seed`.
pub struct Noise {
    seed: u64,
    pos: u64,
    len: u64,
}

impl Noise {
    pub fn new(seed: u64, len: u64) -> Noise {
        Noise { seed, pos: 0, len }
    }

    /// All of it, for small sizes.
    pub fn bytes(seed: u64, len: u64) -> Vec<u8> {
        let mut v = Vec::new();
        Noise::new(seed, len).read_to_end(&mut v).unwrap();
        v
    }
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        let mut i = 0;
        while i < n {
            let off = self.pos + i as u64;
            let word = splitmix(self.seed ^ (off / 8)).to_le_bytes();
            let k = (off % 8) as usize;
            let take = (8 - k).min(n - i);
            buf[i..i + take].copy_from_slice(&word[k..k + take]);
            i += take;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A request with a small body (none, or as `headers` announce), answered.
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    headers: &[(&str, &str)],
) -> Resp {
    headers
        .iter()
        .fold(request(method, path).bearer(bearer), |r, (k, v)| {
            r.header(k, *v)
        })
        .send(addr)
}

pub fn get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Resp {
    call(addr, "GET", path, bearer, &[])
}

/// Streams `len` bytes of `body` as an upload (`Content-Length`, or chunked
/// when `chunked`); returns the response and the SHA-256 of what was sent.
/// A write error (the server answered early and closed) ends the body; the
/// response is read anyway.
pub fn upload_from(
    addr: SocketAddr,
    bearer: Option<&str>,
    content_type: Option<&str>,
    len: u64,
    mut body: impl Read,
    chunked: bool,
) -> (Resp, String) {
    let mut req = request("POST", "/v1/files").bearer(bearer);
    req = if chunked {
        req.header("Transfer-Encoding", "chunked")
    } else {
        req.header("Content-Length", len.to_string())
    };
    if let Some(t) = content_type {
        req = req.header("Content-Type", t);
    }
    let mut s = req.open(addr).expect("start upload");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = body.read(&mut buf).unwrap();
        if n == 0 {
            if chunked {
                let _ = s.write_all(b"0\r\n\r\n");
            }
            break;
        }
        hasher.update(&buf[..n]);
        let sent = if chunked {
            s.write_all(format!("{n:x}\r\n").as_bytes())
                .and_then(|()| s.write_all(&buf[..n]))
                .and_then(|()| s.write_all(b"\r\n"))
        } else {
            s.write_all(&buf[..n])
        };
        if sent.is_err() {
            break;
        }
    }
    let resp = read_resp(s, false).unwrap_or_else(|e| panic!("reading upload answer: {e}"));
    (resp, hex::encode(hasher.finalize()))
}

/// Uploads `bytes`; asserts 201 and returns the answer's JSON.
pub fn upload(
    addr: SocketAddr,
    bearer: &str,
    content_type: Option<&str>,
    bytes: &[u8],
) -> serde_json::Value {
    let (resp, sha) = upload_from(
        addr,
        Some(bearer),
        content_type,
        bytes.len() as u64,
        bytes,
        false,
    );
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    let v = resp.json();
    assert_eq!(v["sha256"], sha);
    assert_eq!(v["size"], bytes.len() as u64);
    v
}

/// GETs `path` and hashes the body as it arrives; returns status, headers,
/// body length and SHA-256.
pub fn download_hash(addr: SocketAddr, path: &str, bearer: Option<&str>) -> (Resp, u64, String) {
    let s = request("GET", path)
        .bearer(bearer)
        .open(addr)
        .expect("start download");
    let mut r = BufReader::with_capacity(256 * 1024, s);
    let (status, headers) = read_head(&mut r).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    (resp, total, hex::encode(hasher.finalize()))
}

/// Names in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts `<data_dir>/files/` holds no file (and `tmp/` is empty), nor
/// the bucket any object, waiting for an abandoned upload's handler to
/// clean up.
pub fn assert_store_empty(setup: &Setup) {
    let files = setup.dir.join("files");
    wait_for(Duration::from_secs(10), "an empty file store", || {
        let bucket_empty = setup.moto.as_ref().is_none_or(|m| m.keys().is_empty());
        let left: Vec<String> = names(&files)
            .into_iter()
            .filter(|n| n != "pending" || !names(&files.join("pending")).is_empty())
            .collect();
        (left == ["tmp"] && names(&files.join("tmp")).is_empty() && bucket_empty).then_some(())
    });
}

/// Waits until `n` uploads are streaming through the server.
fn wait_uploading(setup: &Setup, n: f64) {
    wait_for(Duration::from_secs(10), "uploads to start", || {
        (scrape(setup.http).value("tern_files_uploading") >= n).then_some(())
    });
}

pub fn healthy(server: &TestServer) {
    let (status, body) = http(server.http, "GET", "/healthz", None, "");
    assert_eq!((status, body.as_str()), (200, "ok"));
}

fn small_and_10_mib_files_round_trip(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");
    let bob = server.user("bob");

    for (seed, len) in [(1, 1), (2, 10 * MIB)] {
        let bytes = Noise::bytes(seed, len);
        let v = upload(server.http, &alice, Some("image/png"), &bytes);
        let id = v["id"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(v["content_type"], "image/png");
        let url = v["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("/v1/files/{id}?exp=")), "{url}");
        assert!(url.contains("&sig="), "{url}");
        assert_eq!(stored_size(&server, id), Some(len));

        let path = format!("/v1/files/{id}");
        let sha = sha_hex(&bytes);
        // The uploader, another user, the admin, and the signed URL alone.
        for (p, auth) in [
            (path.as_str(), Some(alice.as_str())),
            (&path, Some(&bob)),
            (&path, Some(ADMIN)),
            (url, None),
        ] {
            let r = get(server.http, p, auth);
            assert_eq!(r.status, 200);
            assert_eq!(sha_hex(&r.body), sha, "{p}");
            assert_eq!(r.header("content-length"), Some(len.to_string().as_str()));
            assert_eq!(r.header("content-type"), Some("image/png"));
            assert_eq!(r.header("etag"), Some(format!("\"{sha}\"").as_str()));
            assert_eq!(r.header("accept-ranges"), Some("bytes"));
        }

        // HEAD: the same headers, no body.
        let r = call(server.http, "HEAD", &path, Some(&bob), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some(len.to_string().as_str()));
        assert_eq!(r.header("etag"), Some(format!("\"{sha}\"").as_str()));
        assert!(r.body.is_empty());

        // A matching ETag: 304, no body; another: the file.
        let etag = format!("\"{sha}\"");
        let r = call(
            server.http,
            "GET",
            &path,
            Some(&bob),
            &[("If-None-Match", &etag)],
        );
        assert_eq!(r.status, 304);
        assert!(r.body.is_empty());
        let r = call(
            server.http,
            "GET",
            &path,
            Some(&bob),
            &[("If-None-Match", "\"x\"")],
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len() as u64, len);
    }

    // No Content-Type: stored as application/octet-stream.
    let v = upload(server.http, &alice, None, b"abc");
    assert_eq!(v["content_type"], "application/octet-stream");
    assert!(names(&dir.path().join("files/tmp")).is_empty());
}

fn range_requests(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");
    let bytes = Noise::bytes(3, 10_000);
    let v = upload(server.http, &alice, None, &bytes);
    let path = format!("/v1/files/{}", v["id"].as_str().unwrap());
    let range = |spec: &str| call(server.http, "GET", &path, Some(&alice), &[("Range", spec)]);

    for (spec, start, end) in [
        ("bytes=0-0", 0, 0),
        ("bytes=-100", 9_900, 9_999),
        ("bytes=1000-1999", 1_000, 1_999),
        ("bytes=9990-", 9_990, 9_999),
        ("bytes=9990-20000", 9_990, 9_999),
    ] {
        let r = range(spec);
        assert_eq!(r.status, 206, "{spec}");
        assert_eq!(r.body, &bytes[start..=end], "{spec}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/10000").as_str()),
            "{spec}"
        );
        assert_eq!(
            r.header("content-length"),
            Some((end - start + 1).to_string().as_str())
        );
    }
    for spec in ["bytes=10000-", "bytes=20000-30000", "bytes=-0"] {
        let r = range(spec);
        r.expect(416, "range_not_satisfiable");
        assert_eq!(r.header("content-range"), Some("bytes */10000"), "{spec}");
    }
    // Several ranges, or nonsense: the whole file.
    for spec in ["bytes=0-1,5-6", "bytes=5-1", "lines=1-2"] {
        let r = range(spec);
        assert_eq!(r.status, 200, "{spec}");
        assert_eq!(r.body, bytes, "{spec}");
    }
}

fn signed_urls(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");
    let bytes = Noise::bytes(4, 5_000);
    let v = upload(server.http, &alice, None, &bytes);
    let url = v["url"].as_str().unwrap().to_owned();
    let (path, query) = url.split_once('?').unwrap();
    let exp: u64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("exp="))
        .unwrap()
        .parse()
        .unwrap();
    let sig = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("sig="))
        .unwrap();
    let now = now_ms() / 1000;
    // About seven days.
    assert!(
        exp > now + 6 * 86_400 && exp <= now + 7 * 86_400 + 60,
        "{exp} vs {now}"
    );

    let r = get(server.http, &url, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);

    // Moved into the past, or extended: the signature no longer matches.
    let past = format!("{path}?exp={}&sig={sig}", now - 3_600);
    get(server.http, &past, None).expect(403, "forbidden");
    let later = format!("{path}?exp={}&sig={sig}", exp + 1);
    get(server.http, &later, None).expect(403, "forbidden");
    // One hex digit of the signature changed.
    let last = sig.chars().last().unwrap();
    let flipped = format!(
        "{}{}",
        &sig[..sig.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let tampered = format!("{path}?exp={exp}&sig={flipped}");
    get(server.http, &tampered, None).expect(403, "forbidden");
    // Half a signature, garbage, or the signature of another file.
    get(server.http, &format!("{path}?exp={exp}"), None).expect(403, "forbidden");
    get(server.http, &format!("{path}?exp={exp}&sig=zz"), None).expect(403, "forbidden");
    let other = upload(server.http, &alice, None, b"other");
    let other_path = format!("/v1/files/{}", other["id"].as_str().unwrap());
    get(server.http, &format!("{other_path}?{query}"), None).expect(403, "forbidden");
    // No credentials at all: 401.
    get(server.http, path, None).expect(401, "unauthorized");

    // The key survives a restart: URLs handed out stay valid.
    server.restart();
    let r = get(server.http, &url, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);
}

fn one_gib_upload_and_download_stream_with_flat_rss(backend: Backend) {
    const LEN: u64 = 1024 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--max-file-size", "2147483648"]);
    let alice = server.user("alice");
    let before = server.rss_kib();
    assert!(before > 0);

    // Sample the server's RSS every 10 ms while the file goes up and down.
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let pid = server.pid();
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let kib = vm_rss_kib(pid).expect("the server's VmRSS");
                peak.fetch_max(kib, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let started = Instant::now();
    let (resp, sent_sha) = upload_from(
        server.http,
        Some(&alice),
        None,
        LEN,
        Noise::new(5, LEN),
        false,
    );
    let up = started.elapsed();
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    let v = resp.json();
    assert_eq!(v["size"], LEN);
    assert_eq!(v["sha256"], sent_sha);
    let after_upload = server.rss_kib();

    let started = Instant::now();
    let path = format!("/v1/files/{}", v["id"].as_str().unwrap());
    let (resp, got, got_sha) = download_hash(server.http, &path, Some(&alice));
    let down = started.elapsed();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-length"),
        Some(LEN.to_string().as_str())
    );
    assert_eq!(got, LEN);
    assert_eq!(got_sha, sent_sha);

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let after = server.rss_kib();
    eprintln!(
        "1 GiB: upload {up:.2?} ({:.0} MiB/s), download {down:.2?} ({:.0} MiB/s); \
         server RSS KiB: before {before}, after upload {after_upload}, peak {peak}, after {after}",
        1024.0 / up.as_secs_f64(),
        1024.0 / down.as_secs_f64(),
    );
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
}

fn over_the_size_limit_nothing_is_kept(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--max-file-size", "1048576"]);
    let alice = server.user("alice");
    let over = |len: u64| {
        let (resp, _) = upload_from(
            server.http,
            Some(&alice),
            None,
            len,
            Noise::new(6, len),
            false,
        );
        resp.expect(413, "payload_too_large");
        assert_store_empty(&server);
    };
    // Refused on the Content-Length, before the body is read: far over,
    // and one byte over.
    over(2 * MIB);
    over(MIB + 1);
    // Exactly at the limit: stored.
    upload(server.http, &alice, None, &Noise::bytes(6, MIB));
    healthy(&server);
}

fn uploads_need_a_content_length(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");
    // Chunked: tiny_http cannot tell a cut-off chunked body from a whole one,
    // so the length is required.
    let (resp, _) = upload_from(
        server.http,
        Some(&alice),
        None,
        MIB,
        Noise::new(6, MIB),
        true,
    );
    resp.expect(411, "length_required");
    // Neither Content-Length nor Transfer-Encoding.
    call(server.http, "POST", "/v1/files", Some(&alice), &[]).expect(411, "length_required");
    assert_store_empty(&server);
    healthy(&server);
}

fn quota_counts_stored_bytes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(
        backend,
        dir.path(),
        &["--max-file-size", "1048576", "--max-files-bytes", "1572864"],
    );
    let alice = server.user("alice");
    let first = upload(server.http, &alice, None, &Noise::bytes(8, MIB));
    let over = |server: &TestServer, token: &str, len: u64| {
        let (resp, _) = upload_from(
            server.http,
            Some(token),
            None,
            len,
            Noise::new(9, len),
            false,
        );
        resp.expect(507, "insufficient_storage");
    };
    over(&server, &alice, MIB);
    // Half a MiB still fits, exactly.
    upload(server.http, &alice, None, &Noise::bytes(10, MIB / 2));
    over(&server, &alice, 1);

    // The count is rebuilt at start...
    server.restart();
    let alice = server.user("alice");
    over(&server, &alice, 1024);
    // ...and a delete gives the room back.
    let path = format!("/v1/files/{}", first["id"].as_str().unwrap());
    let r = call(server.http, "DELETE", &path, Some(&alice), &[]);
    assert_eq!(r.status, 204);
    upload(server.http, &alice, None, &Noise::bytes(9, MIB));
    assert!(names(&dir.path().join("files/tmp")).is_empty());
}

fn concurrent_uploads_share_the_quota(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        backend,
        dir.path(),
        &["--max-file-size", "1048576", "--max-files-bytes", "1572864"],
    );
    let alice = server.user("alice");
    let tmp = dir.path().join("files/tmp");
    // Two 1 MiB uploads, each admitted on its Content-Length while the
    // store is empty; together they would not fit.
    let upload = request("POST", "/v1/files")
        .bearer(Some(&alice))
        .header("Content-Length", MIB.to_string());
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(upload.open(server.http).unwrap());
    }
    wait_uploading(&server, 2.0);
    let mut statuses = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        // The second one's answer may come before its body is all sent.
        let _ = s.write_all(&Noise::bytes(12 + i as u64, MIB));
        let r = read_resp(s, false).unwrap();
        statuses.push(r.status);
        if r.status == 507 {
            r.expect(507, "insufficient_storage");
        }
    }
    assert_eq!(statuses, [201, 507]);
    wait_for(Duration::from_secs(10), "tmp/ to empty", || {
        (names(&tmp).is_empty()).then_some(())
    });
    let meta = names(&dir.path().join("files"));
    assert_eq!(meta.iter().filter(|n| n.ends_with(".json")).count(), 1);
}

fn cut_off_upload_leaves_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");

    // Content-Length 1 MiB, half of it sent, then the socket closed.
    let cut_off = request("POST", "/v1/files")
        .bearer(Some(&alice))
        .header("Content-Length", MIB.to_string());
    let mut s = cut_off.open(server.http).unwrap();
    s.write_all(&Noise::bytes(11, MIB / 2)).unwrap();
    wait_uploading(&server, 1.0);
    s.shutdown(Shutdown::Both).unwrap();
    drop(s);
    assert_store_empty(&server);

    // Cut off right after the headers.
    let s = cut_off.open(server.http).unwrap();
    wait_uploading(&server, 1.0);
    drop(s);
    assert_store_empty(&server);

    // The server goes on serving uploads.
    upload(server.http, &alice, None, b"still here");
    healthy(&server);
}

fn hostile_ids_never_reach_the_file_system(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");
    let v = upload(server.http, &alice, None, b"secret");
    let id = v["id"].as_str().unwrap().to_owned();
    // A file next to the store that traversal would reach.
    std::fs::write(dir.path().join("target"), b"not yours").unwrap();

    // Under the 64 KiB request-line limit of the vendored tiny_http; a
    // longer line is refused by closing (tested in hostile.rs).
    let long = "a".repeat(60 * 1024);
    let paths = [
        "/v1/files/../../etc/passwd".to_owned(),
        "/v1/files/..%2f..%2fetc%2fpasswd".to_owned(),
        "/v1/files/%2e%2e%2f".to_owned(),
        "/v1/files/%2e%2e%2ftarget".to_owned(),
        "/v1/files/..".to_owned(),
        "/v1/files/../target".to_owned(),
        "/v1/files/%00".to_owned(),
        format!("/v1/files/{id}%00"),
        format!("/v1/files/{id}/"),
        format!("/v1/files/{id}/.."),
        format!("/v1/files/{id}.json"),
        format!("/v1/files/{}", id.to_ascii_uppercase()),
        format!("/v1/files/{}", &id[..31]),
        "/v1/files/".to_owned(),
        "/v1/files//etc/passwd".to_owned(),
        format!("/v1/files/{long}"),
    ];
    for path in &paths {
        for method in ["GET", "HEAD", "DELETE"] {
            let r = call(server.http, method, path, Some(ADMIN), &[]);
            assert!(
                r.status == 404 || r.status == 400,
                "{method} {}: {}",
                &path[..path.len().min(80)],
                r.status
            );
            if method != "HEAD" && r.status == 404 {
                r.expect(404, "not_found");
            }
        }
    }
    // A raw NUL byte in the request line.
    let answer = raw_request(
        server.http,
        b"GET /v1/files/\0\0 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .map(|r| r.status);
    assert!(
        matches!(answer, Ok(code) if (100..500).contains(&code)),
        "raw NUL: {answer:?}"
    );

    healthy(&server);
    let r = get(server.http, &format!("/v1/files/{id}"), Some(&alice));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"secret"[..]));
    assert!(dir.path().join("target").exists());
}

fn who_may_do_what(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");
    let bob = server.user("bob");
    let addr = server.http;

    // Uploads need a token.
    let (r, _) = upload_from(addr, None, None, 3, &b"abc"[..], false);
    r.expect(401, "unauthorized");
    let (r, _) = upload_from(addr, Some("not-a-token"), None, 3, &b"abc"[..], false);
    r.expect(401, "unauthorized");
    // Content-Type is kept only if sane.
    let long_type = "a".repeat(300);
    let (r, _) = upload_from(addr, Some(&alice), Some(&long_type), 3, &b"abc"[..], false);
    r.expect(400, "bad_request");
    assert_store_empty(&server);

    let v = upload(addr, &alice, None, b"alice's");
    let path = format!("/v1/files/{}", v["id"].as_str().unwrap());
    // Downloads need a token or a signed URL.
    get(addr, &path, None).expect(401, "unauthorized");
    get(addr, &path, Some("not-a-token")).expect(401, "unauthorized");
    // Unknown ids, well-formed.
    let unknown = format!("/v1/files/{}", "0".repeat(32));
    get(addr, &unknown, Some(&alice)).expect(404, "not_found");
    call(addr, "DELETE", &unknown, Some(&alice), &[]).expect(404, "not_found");
    // Other methods.
    get(addr, "/v1/files", Some(&alice)).expect(405, "method_not_allowed");
    for method in ["PUT", "PATCH", "POST"] {
        let r = call(
            addr,
            method,
            &path,
            Some(&alice),
            &[("Content-Length", "0")],
        );
        r.expect(405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some("GET, HEAD, DELETE"));
    }
    call(addr, "DELETE", "/v1/files", Some(ADMIN), &[]).expect(405, "method_not_allowed");

    // Delete: not by another user, not without a token, not by signed URL.
    call(addr, "DELETE", &path, Some(&bob), &[]).expect(403, "forbidden");
    call(addr, "DELETE", &path, None, &[]).expect(401, "unauthorized");
    let url = v["url"].as_str().unwrap();
    call(addr, "DELETE", url, None, &[]).expect(401, "unauthorized");
    // By the uploader: gone.
    let r = call(addr, "DELETE", &path, Some(&alice), &[]);
    assert_eq!(r.status, 204);
    get(addr, &path, Some(&alice)).expect(404, "not_found");
    get(addr, url, None).expect(404, "not_found");
    call(addr, "DELETE", &path, Some(&alice), &[]).expect(404, "not_found");

    // The admin's uploads: only the admin deletes them, even for a user
    // called "admin".
    let v = upload(addr, ADMIN, None, b"admin's");
    let path = format!("/v1/files/{}", v["id"].as_str().unwrap());
    let admin_user = server.user("admin");
    call(addr, "DELETE", &path, Some(&alice), &[]).expect(403, "forbidden");
    call(addr, "DELETE", &path, Some(&admin_user), &[]).expect(403, "forbidden");
    assert_eq!(get(addr, &path, Some(&bob)).status, 200);
    assert_eq!(call(addr, "DELETE", &path, Some(ADMIN), &[]).status, 204);
    // And the admin deletes anyone's.
    let v = upload(addr, &bob, None, b"bob's");
    let path = format!("/v1/files/{}", v["id"].as_str().unwrap());
    assert_eq!(call(addr, "DELETE", &path, Some(ADMIN), &[]).status, 204);
    assert_store_empty(&server);
}

/// Pins a tiny_http 0.12 bug: a request dropped with its body unread drains
/// the rest into `vec![0; remaining]` (`EqualReader::drop`), so one request
/// announcing a huge Content-Length aborts the whole server on the failed
/// allocation, whatever the handler answered. Fixed by the patched copy in
/// vendor/tiny_http (see vendor/README.md).
fn huge_announced_length_does_not_kill_the_server(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let alice = server.user("alice");
    let mut s = request("POST", "/v1/files")
        .bearer(Some(&alice))
        .header("Content-Length", "1000000000000000")
        .open(server.http)
        .unwrap();
    s.write_all(b"abc").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    read_resp(s, false)
        .unwrap()
        .expect(413, "payload_too_large");
    // The handler drops the request right after answering: the server must
    // keep answering for the next half second.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        healthy(&server);
        std::thread::sleep(Duration::from_millis(20));
    }
}
