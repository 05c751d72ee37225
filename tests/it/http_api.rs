//! The HTTP endpoints of the core issue: users and health.

use crate::util::{http, scrape, TestServer, ADMIN};

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
    let user = server.user("someone");
    // The same answer as for no token: a 403 would tell valid tokens apart.
    check(post(Some(&user), r#"{"address":"a"}"#), 401, "unauthorized");
    check(
        http(server.http, "GET", "/v1/users/someone", Some(&user), ""),
        401,
        "unauthorized",
    );
    check(
        post(Some("wrong"), r#"{"address":"a"}"#),
        401,
        "unauthorized",
    );
    check(post(Some(ADMIN), "{not json"), 400, "bad_request");
    check(
        post(Some(ADMIN), r#"["carol", null, 5]"#),
        400,
        "bad_request",
    );
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
    let huge = format!(r#"{{"address":"{}"}}"#, "a".repeat(9 << 20));
    check(post(Some(ADMIN), &huge), 413, "payload_too_large");
}

/// Without a configured admin token, one is generated into the data
/// directory with mode 0600, and works.
#[test]
fn generated_admin_token() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, http_addr) = crate::util::start_without_admin_token(dir.path());
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

/// Users: GET (online, pending), token rotation and revocation, deletion.
#[test]
fn user_lifecycle() {
    use std::time::Duration;
    use tern::client::{ClientError, Event, Outgoing};
    use tern::wire::{ErrorCode, StatusCode};

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let req =
        |method: &str, path: &str, body: &str| http(server.http, method, path, Some(ADMIN), body);
    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();
    let ta = server.user("alice");
    let tb = server.user("bob");

    let mut alice = server.connect(&ta);
    for i in 1..=3 {
        assert_eq!(
            alice.send_wait(&Outgoing::to("bob", b"x").id(i)).unwrap(),
            StatusCode::SENT
        );
    }
    let (code, body) = req("GET", "/v1/users/bob", "");
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(
        (
            v["address"].as_str(),
            v["online"].as_bool(),
            v["pending"].as_u64()
        ),
        (Some("bob"), Some(false), Some(3))
    );
    assert_eq!(json(&req("GET", "/v1/users/alice", "").1)["online"], true);
    assert_eq!(req("GET", "/v1/users/nobody", "").0, 404);
    assert_eq!(http(server.http, "GET", "/v1/users/bob", None, "").0, 401);

    // A second token; revoking all closes the session and both stop working.
    let (code, body) = req("POST", "/v1/users/bob/tokens", r#"{"token_ttl_secs":3600}"#);
    assert_eq!(code, 201, "{body}");
    let tb2 = json(&body)["token"].as_str().unwrap().to_owned();
    let mut bob = server.connect(&tb2);
    assert_eq!(req("POST", "/v1/users/nobody/tokens", "").0, 404);
    assert_eq!(req("DELETE", "/v1/users/bob/tokens", "").0, 204);
    loop {
        match bob.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(Event::Msg(_))) => continue,
            Err(ClientError::Server { code, .. }) => {
                assert_eq!(code, ErrorCode::AUTH_FAILED);
                break;
            }
            other => panic!("expected ERROR AUTH_FAILED, got {other:?}"),
        }
    }
    for t in [&tb, &tb2] {
        assert!(tern::client::Client::connect(server.addr, t).is_err());
    }

    // Deleting bob: his queued messages are deleted, alice gets DELETED.
    assert_eq!(req("DELETE", "/v1/users/bob", "").0, 204);
    let mut deleted = Vec::new();
    while deleted.len() < 3 {
        match alice.recv_timeout(Duration::from_secs(10)).unwrap() {
            Some(Event::Status(s)) if s.status == StatusCode::DELETED => {
                assert!(s.seq.is_some());
                deleted.push(s.id);
            }
            other => panic!("expected DELETED, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, [1, 2, 3]);
    assert_eq!(req("GET", "/v1/users/bob", "").0, 404);
    assert_eq!(req("DELETE", "/v1/users/bob", "").0, 404);
    assert_eq!(
        alice.send_wait(&Outgoing::to("bob", b"x").id(9)).unwrap(),
        StatusCode::INVALID_DEST
    );
}

/// /metrics parses as Prometheus text and its counters move with traffic.
#[test]
fn metrics_move_with_traffic() {
    use tern::client::Outgoing;
    use tern::wire::StatusCode;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let before = scrape(server.http);
    let ta = server.user("alice");
    server.user("bob");
    let mut alice = server.connect(&ta);
    for i in 1..=5 {
        assert_eq!(
            alice.send_wait(&Outgoing::to("bob", b"x").id(i)).unwrap(),
            StatusCode::SENT
        );
    }
    let after = scrape(server.http);
    let delta = |name| after.value(name) - before.value(name);
    assert_eq!(delta("tern_messages_accepted_total"), 5.0, "accepted");
    assert!(delta("tern_frames_in_total") >= 6.0, "frames in");
    assert_eq!(after.value("tern_connections"), 1.0, "one connection");
    assert!(
        after.has("tern_store_commit_seconds"),
        "commit latency summary present"
    );
}

/// /readyz answers 503 once the server is shutting down. Deterministic
/// only in process: the shutdown sets the phase first and stops HTTP last
/// (`Server::shutdown`), but between the two a SIGTERMed child process
/// gives a window of no set length, so this test sets the phase itself and
/// relies on that order, which it does not check.
#[test]
fn readyz_is_503_while_shutting_down() {
    use tern::config::Config;
    use tern::http::Phase;
    use tern::server::Server;

    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: ([127, 0, 0, 1], 0).into(),
        http_listen: ([127, 0, 0, 1], 0).into(),
        admin_token: Some(ADMIN.into()),
        workers: 1,
        ..Config::default()
    };
    let server = Server::start(config).unwrap();
    let readyz = || http(server.http_listen, "GET", "/readyz", None, "");
    assert_eq!(readyz(), (200, "ready".to_owned()));
    server.backend.set_phase(Phase::ShuttingDown);
    assert_eq!(readyz(), (503, "shutting down".to_owned()));
    server.shutdown().expect("clean shutdown");
}

/// docs/openapi.yaml describes exactly the routes the server serves
/// (`tern::http::api::ROUTES`, checked against the dispatcher by a unit
/// test there), and each of them answers the real binary with neither an
/// error status of the server's nor 404 "no such endpoint".
#[test]
fn openapi_document_matches_the_routes() {
    use std::collections::BTreeSet;
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let mut documented = BTreeSet::new();
    let mut path = String::new();
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("  /") {
            path = format!("/{}", p.trim_end_matches(':'));
        } else if let Some(m) = ["get", "post", "put", "delete", "head", "patch"]
            .iter()
            .find(|m| line == format!("    {m}:"))
        {
            documented.insert((path.clone(), m.to_uppercase()));
        }
    }
    let served: BTreeSet<(String, String)> = tern::http::api::ROUTES
        .iter()
        .map(|(m, p)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(served.len(), tern::http::api::ROUTES.len(), "no repeats");
    assert_eq!(documented, served);

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    for (path, method) in &served {
        let concrete = path
            .replace("{address}", "nobody")
            .replace("{name}", "nogroup")
            .replace("{id}", "0123456789abcdef0123456789abcdef");
        let (code, body) = http(server.http, method, &concrete, Some(ADMIN), "{}");
        assert!(
            (200..500).contains(&code) && code != 405,
            "{method} {path}: {code}"
        );
        assert!(
            !body.contains("no such endpoint"),
            "{method} {path} is not routed"
        );
    }
}

/// Every stage of a durable message (`tern_stage_seconds{stage}` in
/// /metrics) counts each of three messages sent, delivered and ACKed: the
/// per-stage latency is there for anyone to read.
#[test]
fn stage_histograms_count_each_durable_message() {
    use tern::client::Outgoing;
    use tern::wire::{flags, StatusCode};

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    for i in 1..=3 {
        let m = Outgoing::to("bob", b"x")
            .id(i)
            .flags(flags::DELIVERY_RECEIPT);
        assert_eq!(alice.send_wait(&m).unwrap(), StatusCode::SENT);
        let got = crate::util::msg(crate::util::next(&mut bob, 10));
        bob.ack(&[got.seq]).unwrap();
        // DELIVERED comes once the ACK is committed (and its stage counted).
        let s = crate::util::status(crate::util::next(&mut alice, 10));
        assert_eq!((s.id, s.status), (i, StatusCode::DELIVERED));
    }
    let (status, text) = http(server.http, "GET", "/metrics", None, "");
    assert_eq!(status, 200);
    for stage in ["queue", "batch", "sync", "push", "write", "total", "ack"] {
        let line = format!("tern_stage_seconds_count{{stage=\"{stage}\"}} ");
        let count: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line:?} in /metrics"))
            .parse()
            .unwrap();
        assert!(count >= 3, "stage {stage}: {count} samples, expected 3");
    }
    // RocksDB's figures: the three dedup records (and their expiry entries)
    // are counted, and nothing is overdue.
    let gauge = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name:?} in /metrics"))
            .parse()
            .unwrap()
    };
    assert!(gauge("tern_store_keys{cf=\"dedup\"}") >= 3);
    assert!(gauge("tern_store_keys{cf=\"expiry\"}") >= 3);
    assert_eq!(gauge("tern_store_l0_files{cf=\"groups\"}"), 0);
    assert_eq!(gauge("tern_expiry_lag_ms"), 0);
}
