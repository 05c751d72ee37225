//! The HTTP endpoints of the core issue: users and health.

use crate::util::{http, TestServer, ADMIN};

#[test]
fn create_users_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);

    let (status, body) = http(server.http, "GET", "/healthz", None, "");
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, _) = http(server.http, "GET", "/readyz", None, "");
    assert_eq!(status, 200);

    let (status, body) = http(
        server.http,
        "POST",
        "/v1/users",
        Some(ADMIN),
        r#"{"address":"alice","name":"Alice"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["address"], "alice");
    let first = v["token"].as_str().unwrap().to_owned();
    assert!(first.len() >= 32);

    // An existing user gets a fresh token; both work.
    let (status, body) = http(
        server.http,
        "POST",
        "/v1/users",
        Some(ADMIN),
        r#"{"address":"alice"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let second = v["token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    assert_eq!(server.connect(&first).address, "alice");
    assert_eq!(server.connect(&second).address, "alice");

    // A token with a TTL expires.
    let (status, body) = http(
        server.http,
        "POST",
        "/v1/users",
        Some(ADMIN),
        r#"{"address":"carol","token_ttl_secs":0}"#,
    );
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(tern::client::Client::connect(server.addr, v["token"].as_str().unwrap()).is_err());
}

#[test]
fn user_api_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let post = |auth, body: &str| http(server.http, "POST", "/v1/users", auth, body);

    let check = |(status, body): (u16, String), want: u16, code: &str| {
        assert_eq!(status, want, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(v["error"], code, "{body}");
        assert!(v["message"].is_string());
    };
    check(post(None, r#"{"address":"a"}"#), 401, "unauthorized");
    check(
        post(Some("wrong"), r#"{"address":"a"}"#),
        401,
        "unauthorized",
    );
    check(post(Some(ADMIN), "{not json"), 400, "bad_request");
    check(
        post(Some(ADMIN), r#"{"name":"no address"}"#),
        400,
        "bad_request",
    );
    check(
        post(Some(ADMIN), r#"{"address":"../etc/passwd"}"#),
        400,
        "invalid_address",
    );
    check(
        post(Some(ADMIN), r#"{"address":""}"#),
        400,
        "invalid_address",
    );
    check(
        http(server.http, "GET", "/v1/users", Some(ADMIN), ""),
        405,
        "method_not_allowed",
    );
    check(
        http(server.http, "GET", "/nowhere", Some(ADMIN), ""),
        404,
        "not_found",
    );
    let huge = format!(r#"{{"address":"{}"}}"#, "a".repeat(200_000));
    check(post(Some(ADMIN), &huge), 413, "payload_too_large");
}

/// Without a configured admin token, one is generated into the data
/// directory with mode 0600, and works.
#[test]
fn generated_admin_token() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tern"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir.path())
    .env_remove("TERN_ADMIN_TOKEN")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let http_addr: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("http_listen="))
        .unwrap()
        .parse()
        .unwrap();
    let path = dir.path().join("admin.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    let token = std::fs::read_to_string(&path).unwrap();
    let (status, _) = http(
        http_addr,
        "POST",
        "/v1/users",
        Some(token.trim()),
        r#"{"address":"x"}"#,
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600);
    assert_eq!(status, 201);
}
