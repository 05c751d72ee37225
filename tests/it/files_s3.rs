//! What only the s3 backend does, against a real moto server on loopback:
//! direct transfers (a presigned PUT, the completion, a 302 to a presigned
//! GET that serves ranges), completion checks, and a store outage that
//! answers 503 while messages keep flowing, then recovers without a restart.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::files::{
    call, get, sha_hex, start, stored_size, upload, upload_from, Backend, Noise, Setup, MIB,
};
use crate::util::{barrier, http, request, scrape, wait_for, TestServer, ADMIN};

/// A direct-upload request; returns the answer.
pub(crate) fn announce(setup: &TestServer, token: &str, body: &Value) -> crate::util::Resp {
    let body = body.to_string();
    request("POST", "/v1/files")
        .bearer(Some(token))
        .json(&body)
        .send(setup.http)
}

/// PUTs `bytes` to a presigned URL with `content_type`; returns the status.
pub(crate) fn put(url: &str, content_type: &str, bytes: &[u8]) -> u16 {
    match ureq::put(url)
        .set("Content-Type", content_type)
        .send_bytes(bytes)
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("PUT {url}: {e}"),
    }
}

pub(crate) fn complete(setup: &TestServer, token: &str, id: &str) -> crate::util::Resp {
    request("POST", &format!("/v1/files/{id}/complete"))
        .bearer(Some(token))
        .header("Content-Length", "0")
        .send(setup.http)
}

#[test]
fn direct_upload_and_redirected_download() {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(Backend::S3, dir.path(), &["--files-direct", "true"]);
    let alice = setup.user("alice");
    let bob = setup.user("bob");
    let bytes = Noise::bytes(21, 3 * MIB + 17);
    let sha = sha_hex(&bytes);

    let r = announce(
        &setup,
        &alice,
        &json!({"direct": true, "size": bytes.len(), "content_type": "application/pdf", "sha256": sha}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_owned();
    let upload_url = v["upload_url"].as_str().unwrap();
    assert!(upload_url.starts_with("http://127.0.0.1:"), "{upload_url}");
    assert!(upload_url.contains("X-Amz-Signature="), "{upload_url}");
    // Size and type are in the signature.
    assert!(
        upload_url.contains("X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost"),
        "{upload_url}"
    );
    assert_eq!(v["headers"]["Content-Type"], "application/pdf");
    let expires = v["expires"].as_u64().unwrap();
    let now = crate::util::now_ms() / 1000;
    assert!(expires > now && expires <= now + 901, "{expires} vs {now}");

    // Not uploaded yet: 409, and the upload stays open.
    complete(&setup, &alice, &id).expect(409, "not_uploaded");
    // Only the uploader (or the admin) completes it.
    complete(&setup, &bob, &id).expect(403, "forbidden");

    assert_eq!(put(upload_url, "application/pdf", &bytes), 200);
    let r = complete(&setup, &alice, &id);
    assert_eq!(r.status, 201, "{}", r.text());
    let done = r.json();
    assert_eq!(done["id"], id.as_str());
    assert_eq!(done["size"], bytes.len() as u64);
    assert_eq!(done["sha256"], sha.as_str());
    assert_eq!(done["content_type"], "application/pdf");
    // Completing again gives the same answer.
    assert_eq!(complete(&setup, &alice, &id).json()["sha256"], sha.as_str());

    // A download is authorized by tern, then sent to the store.
    let path = format!("/v1/files/{id}");
    for (p, auth) in [
        (path.as_str(), Some(bob.as_str())),
        (done["url"].as_str().unwrap(), None),
    ] {
        let r = get(setup.http, p, auth);
        assert_eq!(r.status, 302, "{p}");
        let location = r.header("location").unwrap().to_owned();
        assert!(location.contains("X-Amz-Signature="), "{location}");
        let resp = ureq::get(&location).call().unwrap();
        assert_eq!(resp.status(), 200);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut got).unwrap();
        assert_eq!(sha_hex(&got), sha);
        // Ranges are the store's to serve.
        let resp = ureq::get(&location)
            .set("Range", "bytes=1000-1999")
            .call()
            .unwrap();
        assert_eq!(resp.status(), 206);
        let mut part = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut part).unwrap();
        assert_eq!(part, &bytes[1000..2000]);
    }
    // Still no credentials, no redirect.
    get(setup.http, &path, None).expect(401, "unauthorized");
    // HEAD is answered by tern from the metadata.
    let r = call(setup.http, "HEAD", &path, Some(&bob), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(bytes.len().to_string().as_str())
    );
    assert_eq!(r.header("etag"), Some(format!("\"{sha}\"").as_str()));

    // Proxied uploads keep working with files_direct on, JSON files too.
    let v = upload(setup.http, &alice, Some("application/json"), b"{\"a\": 1}");
    assert_eq!(stored_size(&setup, v["id"].as_str().unwrap()), Some(8));

    // Delete removes the object.
    assert_eq!(
        call(setup.http, "DELETE", &path, Some(&alice), &[]).status,
        204
    );
    assert_eq!(stored_size(&setup, &id), None);
    get(setup.http, &path, Some(&alice)).expect(404, "not_found");
}

/// Announces a direct upload of `bytes` (no type given) and PUTs them to
/// its URL; returns its id, its URL and the type the URL was signed for.
fn uploaded_direct(setup: &Setup, token: &str, bytes: &[u8]) -> (String, String, String) {
    let v = announce(setup, token, &json!({"direct": true, "size": bytes.len()})).json();
    let url = v["upload_url"].as_str().unwrap().to_owned();
    let content_type = v["headers"]["Content-Type"].as_str().unwrap().to_owned();
    assert_eq!(put(&url, &content_type, bytes), 200);
    (v["id"].as_str().unwrap().to_owned(), url, content_type)
}

/// The bytes behind a download's redirect.
pub(crate) fn fetch_redirected(setup: &TestServer, path: &str, token: &str) -> Vec<u8> {
    let r = get(setup.http, path, Some(token));
    assert_eq!(r.status, 302, "{path}: {}", r.text());
    let resp = ureq::get(r.header("location").unwrap()).call().unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut got).unwrap();
    got
}

/// A presigned PUT URL stays good until it expires, but the store keeps
/// what it puts apart from the file: PUT again after the completion, the
/// file stays what was completed (and hashed); PUT again after a delete,
/// nothing comes back.
#[test]
fn a_presigned_url_cannot_change_a_completed_file() {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(Backend::S3, dir.path(), &["--files-direct", "true"]);
    let alice = setup.user("alice");
    let first = Noise::bytes(31, 200_000);
    let second = Noise::bytes(32, first.len() as u64);
    let (id, url, content_type) = uploaded_direct(&setup, &alice, &first);
    let r = complete(&setup, &alice, &id);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["sha256"], sha_hex(&first).as_str());

    // The same URL, other bytes of the same size: the store takes them...
    assert_eq!(put(&url, &content_type, &second), 200);
    // ...and the file is still what was completed.
    let path = format!("/v1/files/{id}");
    assert_eq!(
        sha_hex(&fetch_redirected(&setup, &path, &alice)),
        sha_hex(&first)
    );
    assert_eq!(
        complete(&setup, &alice, &id).json()["sha256"],
        sha_hex(&first).as_str()
    );

    // Deleted, then PUT again: the file stays gone.
    assert_eq!(
        call(setup.http, "DELETE", &path, Some(&alice), &[]).status,
        204
    );
    assert_eq!(put(&url, &content_type, &second), 200);
    assert_eq!(stored_size(&setup, &id), None);
    get(setup.http, &path, Some(&alice)).expect(404, "not_found");
    complete(&setup, &alice, &id).expect(404, "not_found");
}

/// Completions of one upload sent together (a client retrying one that
/// took long) all get the file: the later ones wait for the first, where
/// they used to get 404 while it ran.
#[test]
fn completions_sent_together_all_get_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(Backend::S3, dir.path(), &["--files-direct", "true"]);
    let alice = setup.user("alice");
    let bytes = Noise::bytes(41, 24 * MIB);
    let (id, _, _) = uploaded_direct(&setup, &alice, &bytes);
    let (go, http, path) = (
        std::sync::Barrier::new(3),
        setup.http,
        format!("/v1/files/{id}/complete"),
    );
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    go.wait();
                    let r = request("POST", &path)
                        .bearer(Some(&alice))
                        .header("Content-Length", "0")
                        .send(http);
                    (r.status, r.text())
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        assert_eq!(*status, 201, "{body}");
        assert!(body.contains(&sha_hex(&bytes)), "{body}");
    }
}

#[test]
fn direct_uploads_are_checked_at_completion() {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(
        Backend::S3,
        dir.path(),
        &[
            "--files-direct",
            "true",
            "--max-files-bytes",
            "3000",
            "--max-file-size",
            "2000",
        ],
    );
    let alice = setup.user("alice");
    let moto = setup.moto.as_ref().unwrap();

    // Over the size limit, or a bad hash: refused before any URL is made.
    announce(&setup, &alice, &json!({"direct": true, "size": 2001}))
        .expect(413, "payload_too_large");
    announce(
        &setup,
        &alice,
        &json!({"direct": true, "size": 1, "sha256": "zz"}),
    )
    .expect(400, "bad_request");
    // Announced uploads hold their bytes of the quota.
    let a = announce(&setup, &alice, &json!({"direct": true, "size": 2000})).json();
    announce(&setup, &alice, &json!({"direct": true, "size": 1500}))
        .expect(507, "insufficient_storage");

    // The store holds another size than announced (moto does not check
    // the signature; a real store refuses the PUT): refused, deleted, and
    // the quota given back.
    let url = a["upload_url"].as_str().unwrap();
    assert_eq!(put(url, "application/octet-stream", &[1; 10]), 200);
    let id = a["id"].as_str().unwrap();
    complete(&setup, &alice, id).expect(400, "bad_request");
    assert_eq!(moto.size(id), None);
    complete(&setup, &alice, id).expect(404, "not_found");
    // Another hash than announced: the same.
    let bytes = vec![7u8; 1500];
    let b = announce(
        &setup,
        &alice,
        &json!({"direct": true, "size": 1500, "sha256": sha_hex(b"something else")}),
    );
    assert_eq!(b.status, 201, "{}", b.text());
    let b = b.json();
    let id = b["id"].as_str().unwrap();
    assert_eq!(
        put(
            b["upload_url"].as_str().unwrap(),
            "application/octet-stream",
            &bytes
        ),
        200
    );
    let r = complete(&setup, &alice, id);
    r.expect(400, "bad_request");
    assert!(r.text().contains("SHA-256"), "{}", r.text());
    assert!(moto.keys().is_empty(), "{:?}", moto.keys());
    // An admin's unknown id.
    complete(&setup, ADMIN, &"a".repeat(32)).expect(404, "not_found");
}

#[test]
fn store_outage_answers_503_and_recovers_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(Backend::S3, dir.path(), &[]);
    let alice_token = setup.user("alice");
    let bob_token = setup.user("bob");
    let before = upload(setup.http, &alice_token, None, b"before the outage");
    let before_path = format!("/v1/files/{}", before["id"].as_str().unwrap());
    let mut alice = setup.connect(&alice_token);
    let mut bob = setup.connect(&bob_token);
    barrier(&mut alice, &mut bob);

    setup.moto.as_mut().unwrap().stop();
    let started = Instant::now();
    let (r, _) = upload_from(
        setup.http,
        Some(&alice_token),
        None,
        5,
        &b"hello"[..],
        false,
    );
    r.expect(503, "store_unavailable");
    assert!(r.text().contains("retry"), "{}", r.text());
    // A large one fails at its first part, before its body is read.
    let len = 8 * MIB;
    let (r, _) = upload_from(
        setup.http,
        Some(&alice_token),
        None,
        len,
        Noise::new(3, len),
        false,
    );
    r.expect(503, "store_unavailable");
    get(setup.http, &before_path, Some(&bob_token)).expect(503, "store_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "503s took {:?}",
        started.elapsed()
    );
    assert!(scrape(setup.http).value("tern_files_store_errors_total") >= 3.0);
    // The protocol side does not care.
    barrier(&mut alice, &mut bob);
    barrier(&mut bob, &mut alice);
    let (status, _) = http(setup.http, "GET", "/healthz", None, "");
    assert_eq!(status, 200);

    // The store is back (empty: moto keeps nothing): files work again.
    setup.moto.as_mut().unwrap().restart();
    let after = upload(
        setup.http,
        &alice_token,
        Some("text/plain"),
        b"after the outage",
    );
    let r = get(
        setup.http,
        &format!("/v1/files/{}", after["id"].as_str().unwrap()),
        Some(&bob_token),
    );
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"after the outage"[..])
    );
    barrier(&mut alice, &mut bob);
}

/// A second S3 implementation, s3rver, takes tern's requests and URLs, and
/// itself refuses presigned URLs once expired. (Neither s3rver nor moto
/// checks SigV4 signatures, so a *tampered* URL cannot be shown refused by
/// a store here; that the size and type are inside the signature is
/// asserted in `direct_upload_and_redirected_download`, and completion
/// checks the size and hash in any case.)
#[test]
fn a_second_store_takes_tern_urls_and_refuses_expired_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::s3::S3rver::start(dir.path());
    let mut args = store.args();
    args.extend(["--files-direct", "true", "--files-direct-ttl", "2"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = crate::util::TestServer::start_with(dir.path(), &args);
    let setup = Setup { server, moto: None };
    let alice = setup.user("alice");

    // Proxied: tern's own signed requests pass.
    let proxied = upload(
        setup.http,
        &alice,
        Some("text/plain"),
        b"proxied through tern",
    );
    let path = format!("/v1/files/{}", proxied["id"].as_str().unwrap());
    let fetch = |url: &str| match ureq::get(url).call() {
        Ok(r) => {
            let status = r.status();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
            (status, body)
        }
        Err(ureq::Error::Status(code, _)) => (code, Vec::new()),
        Err(e) => panic!("GET {url}: {e}"),
    };
    let location = get(setup.http, &path, Some(&alice))
        .header("location")
        .unwrap()
        .to_owned();
    assert_eq!(fetch(&location), (200, b"proxied through tern".to_vec()));

    // Direct: the presigned PUT as signed, then the completion.
    let bytes = Noise::bytes(41, 4096);
    let a = announce(
        &setup,
        &alice,
        &json!({"direct": true, "size": 4096, "content_type": "image/x-test"}),
    )
    .json();
    assert_eq!(
        put(a["upload_url"].as_str().unwrap(), "image/x-test", &bytes),
        200
    );
    let done = complete(&setup, &alice, a["id"].as_str().unwrap());
    assert_eq!(done.status, 201, "{}", done.text());
    assert_eq!(done.json()["sha256"], sha_hex(&bytes).as_str());

    // Expired: both kinds of URL stop working once their 2 s are over.
    let b = announce(&setup, &alice, &json!({"direct": true, "size": 10})).json();
    let expires = b["expires"].as_u64().unwrap();
    crate::util::wait_for(Duration::from_secs(10), "the URLs to expire", || {
        (crate::util::now_ms() / 1000 > expires + 1).then_some(())
    });
    assert_eq!(
        put(
            b["upload_url"].as_str().unwrap(),
            "application/octet-stream",
            &[0; 10]
        ),
        403
    );
    assert_eq!(fetch(&location).0, 403);
}

/// `tern upload` (proxied and `--direct`) and `tern download` (which
/// follows the redirect to the store) with the s3 backend and
/// `files_direct`; the local backend's CLI is in tour.rs and tls.rs.
#[test]
fn cli_uploads_and_downloads_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(Backend::S3, dir.path(), &["--files-direct", "true"]);
    let alice = setup.user("alice");
    let original = dir.path().join("original.bin");
    let bytes = Noise::bytes(51, 6 * MIB + 3);
    std::fs::write(&original, &bytes).unwrap();
    let tern = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .env("TERN_HTTP", setup.http.to_string())
            .env("TERN_ADMIN_TOKEN", ADMIN)
            .output()
            .expect("run tern");
        assert!(
            out.status.success(),
            "tern {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for direct in [false, true] {
        let mut args = vec!["upload", original.to_str().unwrap(), "--token", &alice];
        if direct {
            args.push("--direct");
        }
        let v: Value = serde_json::from_str(&tern(&args)).unwrap();
        assert_eq!(v["sha256"], sha_hex(&bytes).as_str(), "direct: {direct}");
        let copy = dir.path().join(format!("copy-{direct}.bin"));
        let url = v["url"].as_str().unwrap();
        tern(&["download", url, "-o", copy.to_str().unwrap()]);
        assert_eq!(sha_hex(&std::fs::read(&copy).unwrap()), sha_hex(&bytes));
        let id = v["id"].as_str().unwrap();
        let copy = dir.path().join(format!("copy-{direct}-by-id.bin"));
        tern(&[
            "download",
            id,
            "--token",
            &alice,
            "-o",
            copy.to_str().unwrap(),
        ]);
        assert_eq!(std::fs::read(&copy).unwrap().len(), bytes.len());
    }
}

/// Large uploads to the store buffer up to a part (and then parts in
/// flight) in memory: at most 32 of them do at once. With 32 stalled after
/// 2 MiB, a 33rd large one waits for a place, then gets 503, while a small
/// one goes through; once the stalled ones are gone, large ones are taken
/// again.
#[test]
fn large_uploads_buffering_at_once_are_bounded() {
    use std::io::Write;
    const PLACES: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let setup = start(Backend::S3, dir.path(), &[]);
    let alice = setup.user("alice");
    let len = 8 * MIB;
    let chunk = vec![0x77u8; 2 * MIB as usize];
    let stalled: Vec<_> = (0..PLACES)
        .map(|_| {
            let mut s = request("POST", "/v1/files")
                .bearer(Some(&alice))
                .header("Content-Length", len.to_string())
                .open(setup.http)
                .unwrap();
            s.write_all(&chunk).unwrap();
            s
        })
        .collect();
    // Every stalled upload holds its place once the server has read more
    // than 1 MiB of it: the 33rd waits (up to 10 s), then is refused.
    // `metrics` shows what the server is doing if it does not answer (once
    // in CI, a GET /metrics here went unanswered for 60 s: tiny_http's pool
    // had queued its connection behind the stalled uploads; see
    // vendor/README.md, *A thread for every connection of a burst*).
    wait_for(Duration::from_secs(30), "32 places taken", || {
        (setup.metrics().value("tern_files_large_uploads") == PLACES as f64).then_some(())
    });
    // A byte a second each, so that no stalled upload reaches the server's
    // 10 s read timeout (and gives its place back) meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        let mut sockets: Vec<_> = stalled.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut sockets {
                    let _ = s.write_all(b"x");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let started = Instant::now();
    let (r, _) = upload_from(
        setup.http,
        Some(&alice),
        None,
        len,
        Noise::new(5, len),
        false,
    );
    r.expect(503, "store_unavailable");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "refused after {:?}, without waiting for a place",
        started.elapsed()
    );
    upload(setup.http, &alice, None, &[1u8; 100 << 10]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickle.join().unwrap();
    drop(stalled);
    let (r, _) = upload_from(
        setup.http,
        Some(&alice),
        None,
        len,
        Noise::new(6, len),
        false,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    wait_for(Duration::from_secs(10), "every place given back", || {
        (setup.metrics().value("tern_files_large_uploads") == 0.0).then_some(())
    });
}
