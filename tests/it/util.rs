//! Helpers: start the real `tern` binary on 127.0.0.1:0 with a temporary
//! data directory, talk to it over HTTP and the protocol, kill it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern::client::{Client, Event, Options};

/// The admin token every test server is started with.
pub const ADMIN: &str = "test-admin-token";

/// A `tern serve` child process.
pub struct TestServer {
    child: Option<Child>,
    /// Protocol address.
    pub addr: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// The data directory (kept across restarts).
    pub dir: PathBuf,
    /// Extra flags, reused on restart.
    args: Vec<String>,
}

impl TestServer {
    /// Starts a server in a new temporary data directory.
    pub fn start(dir: &tempfile::TempDir) -> TestServer {
        TestServer::start_with(dir.path(), &[])
    }

    /// Starts a server on `dir` with extra `serve` flags.
    pub fn start_with(dir: &Path, args: &[&str]) -> TestServer {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--admin-token", ADMIN, "--log", "tern=warn"])
            .args(&args)
            .env_remove("TERN_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"));
        match log {
            Ok(f) => cmd.stderr(Stdio::from(f)),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        let mut child = cmd.spawn().expect("spawn tern");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("tern ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                panic!("server did not become ready; log:\n{log}");
            }
        };
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        TestServer {
            addr: field("listen="),
            http: field("http_listen="),
            child: Some(child),
            dir: dir.to_path_buf(),
            args,
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a process that was already signalled to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        child.wait().expect("wait")
    }

    /// Starts the server again on the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        *self = TestServer::start_with(&self.dir.clone(), &args);
    }

    /// Resident memory of the server process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Creates a user through the admin API; returns its token.
    pub fn user(&self, address: &str) -> String {
        let (status, body) = http(
            self.http,
            "POST",
            "/v1/users",
            Some(ADMIN),
            &format!(r#"{{"address":"{address}"}}"#),
        );
        assert!(
            status == 201 || status == 200,
            "create {address}: {status} {body}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["token"].as_str().expect("token").to_owned()
    }

    /// Logs in with a token.
    pub fn connect(&self, token: &str) -> Client {
        Client::connect(self.addr, token).expect("connect")
    }

    /// Logs in with a token and a KEEPALIVE proposal.
    pub fn connect_keepalive(&self, token: &str, keepalive: u32) -> Client {
        let options = Options {
            keepalive: Some(keepalive),
            ..Options::default()
        };
        Client::connect_with(self.addr, token, options).expect("connect")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("http connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("http write");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("http read");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Receives the next event within `secs`, or panics.
pub fn next(c: &mut Client, secs: u64) -> Event {
    c.recv_timeout(Duration::from_secs(secs))
        .expect("recv")
        .unwrap_or_else(|| panic!("no event within {secs} s"))
}

/// Asserts nothing arrives within `ms`.
pub fn quiet(c: &mut Client, ms: u64) {
    if let Some(e) = c.recv_timeout(Duration::from_millis(ms)).expect("recv") {
        panic!("unexpected event {e:?}");
    }
}
