//! TLS on both listeners (`tls_cert`, `tls_key`): a CA and a server
//! certificate made by `Pki::generate` (what `tern gen-cert` writes), the
//! real client over rustls, the CLI, ureq and curl over HTTPS, openssl's
//! s_client, and a certificate renewed under a running server (SIGHUP).

use std::path::Path;
use std::time::Duration;

use tern::client::{tls_config, Client, ClientError, Event, Options, Tls};
use tern::tls::Pki;

use crate::util::{https_agent, https_url, next, TestServer, ADMIN};

/// Writes `ca.pem`, `cert.pem` and `key.pem` (for localhost and 127.0.0.1)
/// under `dir`.
fn make_certs(dir: &Path, ca_name: &str) {
    Pki::generate(ca_name, &["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .write(dir)
        .unwrap();
}

/// A server on `dir` speaking TLS with a certificate made under `pki`
/// (whose `ca.pem` clients then trust).
fn tls_server(dir: &Path, pki: &Path) -> TestServer {
    make_certs(pki, "tern test CA");
    TestServer::start_tls(dir, pki, &[])
}

fn tls_options(ca: &Path) -> Options {
    Options {
        tls: Some(Tls {
            config: tls_config(ca).unwrap(),
            server_name: "localhost".try_into().unwrap(),
        }),
        ..Options::default()
    }
}

/// A client that trusts the CA talks over TLS; a plaintext client on the
/// TLS port is closed without harming others; a client that trusts another
/// CA fails with a TLS error.
#[test]
fn the_protocol_listener_speaks_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), pki.path());
    let token = server.user("alice");
    let mut alice =
        Client::connect_with(server.addr, &token, tls_options(&pki.path().join("ca.pem")))
            .expect("login over TLS");
    alice.ping(Some(5)).unwrap();
    assert!(matches!(next(&mut alice, 10), Event::Pong(Some(5))));

    // The CLI, with --ca: bob sends alice a message over TLS.
    let bob = server.user("bob");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "send",
            "--server",
            &server.addr.to_string(),
            "--token",
            &bob,
        ])
        .arg("--ca")
        .arg(pki.path().join("ca.pem"))
        .args(["alice", "over tls"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match next(&mut alice, 10) {
        Event::Msg(m) => assert_eq!(m.payload, b"over tls"),
        other => panic!("expected the CLI's message, got {other:?}"),
    }

    // Plaintext on the TLS port: refused, and alice goes on.
    let plain = Client::connect(server.addr, &token);
    assert!(
        plain.is_err(),
        "a plaintext login on the TLS port succeeded"
    );
    alice.ping(Some(6)).unwrap();
    assert!(matches!(next(&mut alice, 10), Event::Pong(Some(6))));

    // A client that trusts another CA.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path(), "another CA");
    match Client::connect_with(
        server.addr,
        &token,
        tls_options(&other.path().join("ca.pem")),
    ) {
        Err(ClientError::Tls(reason)) => assert!(reason.contains("certificate"), "{reason}"),
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("a client that trusts another CA logged in"),
    }
}

/// Bad certificate settings stop the server at start-up, naming the file.
#[test]
fn bad_certificates_are_start_up_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    make_certs(pki.path(), "tern test CA");
    let junk = pki.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--tls-cert", junk.to_str().unwrap()])
        .args(["--tls-key", pki.path().join("key.pem").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("junk.pem"), "{stderr}");
}

/// `openssl s_client`: TLS 1.3 is negotiated, and TLS 1.1 and 1.0 are
/// refused (rustls has nothing older than 1.2).
#[test]
fn tls_1_3_is_negotiated_and_1_0_and_1_1_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), pki.path());
    // SECLEVEL=0 lets this openssl offer the old versions at all (Debian's
    // default refuses them on the client side), so a refusal is the server's.
    let s_client = |version: &str| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &server.addr.to_string(), version])
            .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
            .arg("-CAfile")
            .arg(pki.path().join("ca.pem"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl runs (.ci/run installs it)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = s_client("-tls1_3");
    assert!(ok && text.contains("TLSv1.3"), "{text}");
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    for old in ["-tls1_1", "-tls1"] {
        let (ok, text) = s_client(old);
        assert!(!ok, "{old} was accepted:\n{text}");
        // The ClientHello went out and the server answered with an alert,
        // never with its certificate.
        assert!(
            text.contains("no peer certificate available")
                && text.contains("SSL handshake has read"),
            "{old}: not refused by the server:\n{text}"
        );
    }
}

/// `tern` with `--ca`, against the server's HTTP listener.
fn cli(server: &TestServer, ca: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .args(["--http", &server.http.to_string()])
        .args(["--admin-token", ADMIN])
        .arg("--ca")
        .arg(ca)
        .output()
        .unwrap()
}

/// The HTTP API and the files API over HTTPS: ureq with a pooled
/// connection (several requests on one TLS session), the CLI with `--ca`
/// (admin call, upload, download), curl with `--cacert` and a range on the
/// signed link. Plain HTTP on the HTTPS port gets no answer and harms no one.
#[test]
fn the_http_listener_speaks_https() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), pki.path());
    let ca = pki.path().join("ca.pem");
    let agent = https_agent(&ca, server.http);
    for _ in 0..5 {
        let r = agent
            .get(&https_url(server.http, "/readyz"))
            .call()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.into_string().unwrap(), "ready");
    }
    let token = server.user("alice");

    // The CLI: an admin call, then a 3 MB upload and its download.
    let out = cli(&server, &ca, &["user", "add", "bob"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = tempfile::tempdir().unwrap();
    let original: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let file = work.path().join("big.bin");
    std::fs::write(&file, &original).unwrap();
    let out = cli(
        &server,
        &ca,
        &["upload", file.to_str().unwrap(), "--token", &token],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, url) = (
        answer["id"].as_str().unwrap(),
        answer["url"].as_str().unwrap(),
    );
    let copy = work.path().join("copy.bin");
    let out = cli(
        &server,
        &ca,
        &[
            "download",
            id,
            "--token",
            &token,
            "-o",
            copy.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&copy).unwrap() == original,
        "download differs"
    );

    // curl, on the signed link, with a range.
    let port = server.http.port();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-H", "Range: bytes=1000-1999"])
        .arg(https_url(server.http, url))
        .output()
        .expect("curl runs (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == original[1000..2000], "range differs");

    // Plain HTTP on the HTTPS port: no HTTP answer; HTTPS goes on.
    let answer = crate::util::raw_exchange(server.http, b"GET /readyz HTTP/1.1\r\n\r\n");
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered");
    let r = agent
        .get(&https_url(server.http, "/readyz"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A renewed certificate (from `tern gen-cert`, another CA) is taken on
/// SIGHUP by the connections that come next, on both listeners; the open
/// ones go on; a broken renewal leaves the certificate in use.
#[test]
fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), pki.path());
    let old_ca = tempfile::tempdir().unwrap();
    std::fs::copy(pki.path().join("ca.pem"), old_ca.path().join("ca.pem")).unwrap();
    let old_ca = old_ca.path().join("ca.pem");
    let token = server.user("alice");
    let mut alice = Client::connect_with(server.addr, &token, tls_options(&old_ca)).unwrap();

    // gen-cert will not overwrite without --force; with it, a new CA.
    let gen = |force: bool| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["gen-cert", "--out"])
            .arg(pki.path())
            .args(["--name", "localhost"])
            .args(force.then_some("--force"))
            .output()
            .unwrap()
    };
    let out = gen(false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = gen(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_ca = pki.path().join("ca.pem");

    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup();
    server.wait_stdout("tern tls-reloaded", Duration::from_secs(10));

    // New connections: the new CA is trusted, the old one is not.
    let bob = server.user("bob");
    let mut fresh = Client::connect_with(server.addr, &bob, tls_options(&new_ca)).unwrap();
    fresh.ping(Some(1)).unwrap();
    assert!(matches!(next(&mut fresh, 10), Event::Pong(Some(1))));
    assert!(matches!(
        Client::connect_with(server.addr, &bob, tls_options(&old_ca)),
        Err(ClientError::Tls(_))
    ));
    // The status of /readyz over HTTPS trusting `ca`, or the error.
    let https = |ca: &Path| -> Result<u16, String> {
        https_agent(ca, server.http)
            .get(&https_url(server.http, "/readyz"))
            .call()
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    };
    assert_eq!(https(&new_ca), Ok(200));
    let refused = https(&old_ca).expect_err("HTTPS still shows the old certificate");
    assert!(refused.contains("certificate"), "{refused}");
    // The connection opened before the reload goes on.
    alice.ping(Some(2)).unwrap();
    assert!(matches!(next(&mut alice, 10), Event::Pong(Some(2))));

    // A broken renewal: the reload fails, the certificate in use stays.
    std::fs::write(pki.path().join("cert.pem"), "half a certificate").unwrap();
    hup();
    server.wait_stdout("tern tls-reload-failed", Duration::from_secs(10));
    assert_eq!(https(&new_ca), Ok(200));
    assert!(Client::connect_with(server.addr, &bob, tls_options(&new_ca)).is_ok());
}

/// `wss://`: the WebSocket transport under TLS on the protocol port, to a
/// TCP client under TLS.
#[test]
fn websocket_over_tls() {
    use crate::ws::Got;
    use tern::wire::{self, Frame, StatusCode};
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), pki.path());
    let ca = pki.path().join("ca.pem");
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = wss_login(&server, &ca, &ta);
    let mut bob = Client::connect_with(server.addr, &tb, tls_options(&ca)).unwrap();
    alice.send(&[Frame::Send(wire::Send {
        id: Some(1),
        to: Some("bob"),
        flags: Some(0),
        payload: Some(b"over wss"),
        ..Default::default()
    })]);
    assert_eq!(alice.next(), Got::Status(1, StatusCode::SENT));
    match next(&mut bob, 10) {
        Event::Msg(m) => assert_eq!(
            (m.from.as_str(), &m.payload[..]),
            ("alice", &b"over wss"[..])
        ),
        other => panic!("expected alice's message, got {other:?}"),
    }
}

/// A client that trickles its TLS hello to the HTTPS listener, each byte
/// well within the read timeout, is closed once the handshake deadline
/// (10 s from the accept) is past: it cannot hold a connection thread for
/// as long as it likes. The listener goes on answering.
#[test]
fn a_trickled_tls_handshake_is_cut_off() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), pki.path());
    let mut s = std::net::TcpStream::connect(server.http).unwrap();
    // One byte a second: the read timeout paces the trickle.
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    // A handshake record header announcing 512 bytes, then its body.
    let mut bytes = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    bytes.resize(6 + 511, 0);
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    for &b in bytes.iter().cycle() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a trickled handshake held its connection for 30 s"
        );
        if s.write_all(&[b]).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue, // an alert: the close follows
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let r = https_agent(&pki.path().join("ca.pem"), server.http)
        .get(&https_url(server.http, "/readyz"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A WebSocket over TLS closed (here, replaced by a second login) while a
/// backlog larger than rustls' buffer waits for the socket: the client
/// reads the backlog, then ERROR REPLACED, then the WebSocket Close; the
/// TLS close_notify comes only after them.
#[test]
fn websocket_over_tls_replaced_with_a_backlog_gets_its_error() {
    use crate::util::send_pipelined;
    use crate::ws::Got;
    use tern::client::Outgoing;
    use tern::wire::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), pki.path());
    let ca = pki.path().join("ca.pem");
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut bob = wss_login(&server, &ca, &tb);
    // 9.4 MiB for bob, who does not read yet: his socket blocks with a
    // WebSocket message of up to conn_buffer (1 MiB) on its way.
    let mut alice = Client::connect_with(server.addr, &ta, tls_options(&ca)).unwrap();
    let payload = vec![0x42u8; 16 << 10];
    let accepted = send_pipelined(
        &mut alice,
        600,
        (50, 50),
        |i| Outgoing::to("bob", &payload).id(i + 1).flags(0),
        |_| {},
    );
    assert_eq!(accepted, 600);
    let _bob_again = Client::connect_with(server.addr, &tb, tls_options(&ca)).unwrap();
    let mut got = 0;
    loop {
        match bob.next() {
            Got::Msg { .. } => got += 1,
            Got::Error(code) => {
                assert_eq!(code, ErrorCode::REPLACED);
                break;
            }
            other => panic!("after {got} messages: {other:?}, not ERROR REPLACED"),
        }
    }
    assert_eq!(bob.next(), Got::Closed);
}

/// A WebSocket client over TLS (trusting `ca`), logged in with `token`.
fn wss_login(server: &TestServer, ca: &Path, token: &str) -> crate::ws::WsClient {
    let socket = std::net::TcpStream::connect(server.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let session =
        rustls::ClientConnection::new(tls_config(ca).unwrap(), "localhost".try_into().unwrap())
            .unwrap();
    let stream = rustls::StreamOwned::new(session, socket);
    crate::ws::WsClient::open_over(server.addr, Box::new(stream)).hello(token)
}
