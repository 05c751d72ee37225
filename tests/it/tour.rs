//! The README tour, run as written (with the test server's addresses in
//! TERN_SERVER / TERN_HTTP and its admin token in TERN_ADMIN_TOKEN).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::util::{TestServer, ADMIN};

fn tern(server: &TestServer, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("TERN_SERVER", server.addr.to_string())
        .env("TERN_HTTP", server.http.to_string())
        .env("TERN_ADMIN_TOKEN", ADMIN)
        .output()
        .expect("run tern");
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[test]
fn readme_tour() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let alice = tern(&server, &["user", "add", "alice"]);
    let bob = tern(&server, &["user", "add", "bob"]);
    assert!(alice.len() >= 32 && bob.len() >= 32);

    let mut listen = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["listen", "--token", &bob, "--count", "2"])
        .env("TERN_SERVER", server.addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern listen");
    // Wait for "listening as bob" on stderr: then the session is up.
    let mut stderr = BufReader::new(listen.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening as bob"), "{line}");

    let sent = tern(
        &server,
        &["send", "--token", &alice, "bob", "hello bob", "--wait", "3"],
    );
    assert!(sent.starts_with("sent id="), "{sent}");
    assert!(sent.contains("delivered"), "receipt printed: {sent}");

    let file = dir.path().join("report.txt");
    std::fs::write(&file, "the report\n").unwrap();
    let url = tern(
        &server,
        &[
            "upload",
            "--token",
            &alice,
            file.to_str().unwrap(),
            "--url-only",
        ],
    );
    assert!(url.starts_with("http://") && url.contains("sig="), "{url}");
    let sent = tern(&server, &["send", "--token", &alice, "bob", &url]);
    assert!(sent.starts_with("sent"), "{sent}");

    let out = listen.wait_with_output().expect("listen");
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (lines[0]["from"].as_str(), lines[0]["payload"].as_str()),
        (Some("alice"), Some("hello bob"))
    );
    assert_eq!(lines[1]["payload"].as_str(), Some(url.as_str()));

    let copy = dir.path().join("copy.txt");
    tern(&server, &["download", &url, "-o", copy.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "the report\n");

    // Groups, as the tour says.
    tern(&server, &["group", "put", "team", "alice", "bob"]);
    let sent = tern(
        &server,
        &["send", "--token", &alice, "--group", "team", "hi all"],
    );
    assert!(sent.starts_with("sent"), "{sent}");

    // Errors: a clear message and a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["user", "show", "nobody"])
        .env("TERN_HTTP", server.http.to_string())
        .env("TERN_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["user", "add", "x"])
        .env("TERN_HTTP", "127.0.0.1:1")
        .env("TERN_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the server"));
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["user", "add", "x"])
        .env("TERN_HTTP", server.http.to_string())
        .env("TERN_ADMIN_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}
