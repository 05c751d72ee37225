//! TLS on the protocol listener (`tls_cert`, `tls_key`): a CA and a server
//! certificate made by the test with rcgen, the real client over rustls.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tern::client::{tls_config, Client, ClientError, Event, Options, Tls};

use crate::util::{next, TestServer};

/// Writes `ca.pem`, `cert.pem` and `key.pem` (for localhost and 127.0.0.1)
/// under `dir`.
fn make_certs(dir: &Path, ca_name: &str) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

/// A server on `dir` speaking TLS with a certificate made under `pki`
/// (whose `ca.pem` clients then trust).
fn tls_server(dir: &Path, pki: &Path) -> TestServer {
    make_certs(pki, "tern test CA");
    let (cert, key) = (pki.join("cert.pem"), pki.join("key.pem"));
    TestServer::start_with(
        dir,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
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
