//! Retention (`files_max_age`, abandoned uploads) and thumbnails, on both
//! backends (`files_more::local::*`, `files_more::s3::*`), plus the
//! direct uploads that the sweep removes when never completed (s3 only).

use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use serde_json::json;

use crate::files::{
    assert_store_empty, call, get, healthy, names, on_both_backends, start, upload, Backend, Noise,
    MIB,
};
use crate::util::{request, scrape, vm_rss_kib, wait_for};

on_both_backends!(
    files_older_than_max_age_are_deleted,
    abandoned_uploads_are_removed,
    jpeg_and_png_get_thumbnails,
    bombs_and_liars_get_no_thumbnail_and_bounded_memory,
);

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A photo-like JPEG (a gradient), `w` × `h`.
fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
}

/// A PNG with transparency, `w` × `h`.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = RgbaImage::from_fn(w, h, |x, _| Rgba([200, 10, 10, (x % 256) as u8]));
    encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

/// A valid PNG of `w` × `h` one-bit pixels, all black: a few hundred KiB
/// that decode to `w * h` bytes (2.5 GB for 50,000 × 50,000). Written
/// row by row through the deflater, never whole in memory here either.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]); // 1 bit, grayscale
    chunk(&mut out, b"IHDR", &ihdr);
    let row = vec![0u8; 1 + (w as usize).div_ceil(8)];
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..h {
        z.write_all(&row).unwrap();
    }
    let idat = z.finish().unwrap();
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// GETs a thumbnail URL (no token) and decodes it.
fn thumbnail(setup: &crate::files::Setup, url: &str) -> DynamicImage {
    let r = get(setup.http, url, None);
    assert_eq!(r.status, 200, "{url}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    image::load_from_memory_with_format(&r.body, ImageFormat::Jpeg).expect("a JPEG thumbnail")
}

fn files_older_than_max_age_are_deleted(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(backend, dir.path(), &["--files-max-age", "3s"]);
    let alice = setup.user("alice");
    let file = upload(setup.http, &alice, None, &Noise::bytes(31, 100_000));
    let picture = upload(setup.http, &alice, Some("image/png"), &png(400, 300));
    assert!(picture["thumbnail"].is_string(), "{picture}");
    // Young files stay.
    let path = format!("/v1/files/{}", file["id"].as_str().unwrap());
    assert_eq!(get(setup.http, &path, Some(&alice)).status, 200);

    wait_for(Duration::from_secs(20), "files to expire", || {
        (scrape(setup.http).value("tern_files_expired_total") == 2.0).then_some(())
    });
    get(setup.http, &path, Some(&alice)).expect(404, "not_found");
    get(setup.http, picture["thumbnail"].as_str().unwrap(), None).expect(404, "not_found");
    // Bytes, thumbnail and metadata: all gone, from disk or bucket.
    assert_store_empty(&setup);
    healthy(&setup);
}

fn abandoned_uploads_are_removed(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = match backend {
        Backend::Local => start(backend, dir.path(), &[]),
        Backend::S3 => start(
            backend,
            dir.path(),
            &[
                "--files-direct",
                "true",
                "--files-direct-ttl",
                "1",
                "--max-files-bytes",
                "1000",
            ],
        ),
    };
    let alice = setup.user("alice");
    match backend {
        Backend::Local => {
            // An upload cut short by a crash leaves its partial file...
            let mut s = request("POST", "/v1/files")
                .bearer(Some(&alice))
                .header("Content-Length", (2 * MIB).to_string())
                .open(setup.http)
                .unwrap();
            s.write_all(&Noise::bytes(32, MIB)).unwrap();
            let tmp = dir.path().join("files/tmp");
            wait_for(Duration::from_secs(10), "a partial file", || {
                (!names(&tmp).is_empty()).then_some(())
            });
            setup.sigkill();
            assert!(!names(&tmp).is_empty());
            // ...which the next start removes.
            setup.restart();
            assert_store_empty(&setup);
        }
        Backend::S3 => {
            let announce = |size: u64| {
                let body = json!({"direct": true, "size": size}).to_string();
                request("POST", "/v1/files")
                    .bearer(Some(&alice))
                    .json(&body)
                    .send(setup.http)
            };
            // One announced and uploaded, one announced only; neither completed.
            let a = announce(600);
            assert_eq!(a.status, 201, "{}", a.text());
            let a = a.json();
            let status = ureq::put(a["upload_url"].as_str().unwrap())
                .set("Content-Type", "application/octet-stream")
                .send_bytes(&[5; 600])
                .unwrap()
                .status();
            assert_eq!(status, 200);
            announce(400).json();
            // They hold the quota while they may still be completed.
            announce(1).expect(507, "insufficient_storage");
            wait_for(Duration::from_secs(20), "abandoned uploads to go", || {
                (scrape(setup.http).value("tern_files_abandoned_total") == 2.0).then_some(())
            });
            assert_store_empty(&setup);
            let id = a["id"].as_str().unwrap();
            call(
                setup.http,
                "POST",
                &format!("/v1/files/{id}/complete"),
                Some(&alice),
                &[("Content-Length", "0")],
            )
            .expect(404, "not_found");
            // The quota is free again.
            assert_eq!(announce(1000).status, 201);
        }
    }
    healthy(&setup);
}

fn jpeg_and_png_get_thumbnails(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(backend, dir.path(), &[]);
    let alice = setup.user("alice");
    for (bytes, content_type, size) in [
        (jpeg(1024, 768), "image/jpeg", (256, 192)),
        (png(300, 600), "image/png", (128, 256)),
        (png(100, 50), "image/png", (100, 50)),
        (
            encode(
                &DynamicImage::ImageRgba8(RgbaImage::new(512, 512)),
                ImageFormat::Gif,
            ),
            "image/gif",
            (256, 256),
        ),
    ] {
        let v = upload(setup.http, &alice, Some(content_type), &bytes);
        let url = v["thumbnail"].as_str().unwrap_or_else(|| panic!("{v}"));
        let id = v["id"].as_str().unwrap();
        assert!(
            url.starts_with(&format!("/v1/files/{id}/thumbnail?exp=")),
            "{url}"
        );
        let thumb = thumbnail(&setup, url);
        assert_eq!((thumb.width(), thumb.height()), size, "{content_type}");
        // With a token too; the file's own URL does not open it.
        let path = format!("/v1/files/{id}/thumbnail");
        assert_eq!(get(setup.http, &path, Some(&alice)).status, 200);
        let file_query = v["url"].as_str().unwrap().split_once('?').unwrap().1;
        get(setup.http, &format!("{path}?{file_query}"), None).expect(403, "forbidden");
        // The file itself is the uploaded bytes.
        let r = get(setup.http, &format!("/v1/files/{id}"), Some(&alice));
        assert_eq!(r.body, bytes);
    }
    // Not an image: no thumbnail.
    let v = upload(setup.http, &alice, Some("text/plain"), b"words");
    assert!(v.get("thumbnail").is_none(), "{v}");
    let path = format!("/v1/files/{}/thumbnail", v["id"].as_str().unwrap());
    get(setup.http, &path, Some(&alice)).expect(404, "not_found");
    assert_eq!(scrape(setup.http).value("tern_files_thumbnails_total"), 4.0);
}

fn bombs_and_liars_get_no_thumbnail_and_bounded_memory(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let setup = start(backend, dir.path(), &[]);
    let alice = setup.user("alice");
    let bomb = png_bomb(50_000, 50_000);
    assert!(bomb.len() < 1 << 20, "bomb of {} bytes", bomb.len());
    let photo = jpeg(800, 600);
    let cut = photo[..photo.len() / 2].to_vec();
    let mut garbage = b"\x89PNG\r\n\x1a\n".to_vec();
    garbage.extend_from_slice(&Noise::bytes(33, 10_000));

    let before = setup.rss_kib();
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), setup.pid());
        std::thread::spawn(move || {
            // Ends with the process too (a crash fails `healthy` below).
            while let (false, Some(kib)) = (stop.load(Ordering::Relaxed), vm_rss_kib(pid)) {
                peak.fetch_max(kib, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let cases: [(&str, &[u8], &str); 5] = [
        ("a 50,000 x 50,000 PNG bomb", &bomb, "image/png"),
        ("a truncated JPEG", &cut, "image/jpeg"),
        (
            "text that says it is a PNG",
            b"not a picture at all",
            "image/png",
        ),
        ("a JPEG that says it is a PNG", &photo, "image/png"),
        ("a PNG signature and noise", &garbage, "image/png"),
    ];
    for (what, bytes, content_type) in cases {
        let v = upload(setup.http, &alice, Some(content_type), bytes);
        assert!(v.get("thumbnail").is_none(), "{what}: {v}");
        // Stored all the same, byte for byte.
        let r = get(
            setup.http,
            &format!("/v1/files/{}", v["id"].as_str().unwrap()),
            Some(&alice),
        );
        assert_eq!(r.body, *bytes, "{what}");
        healthy(&setup);
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!("thumbnail refusals: server RSS {before} KiB before, peak {peak} KiB");
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    let m = scrape(setup.http);
    assert_eq!(m.value("tern_files_thumbnails_refused_total"), 5.0);
    assert_eq!(m.value("tern_files_thumbnails_total"), 0.0);
}
