//! Helpers: start the real `tern` binary on 127.0.0.1:0 with a temporary
//! data directory and kill it; one HTTP client; the marker barrier that
//! proves nothing else was queued for a client; a pipelined send burst; one
//! deadline-polling wait; the clock, VmRSS and /metrics readers.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern::client::{Client, Event, Message, Options, Outgoing, StatusEvent};
use tern::wire::StatusCode;

/// The admin token every test server is started with.
pub const ADMIN: &str = "test-admin-token";

/// A `tern serve` child process.
pub struct TestServer {
    /// `None` once the process was killed or waited for.
    child: Option<Child>,
    /// Protocol address.
    pub addr: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// The data directory (kept across restarts).
    pub dir: PathBuf,
    /// Extra flags, reused on restart.
    args: Vec<String>,
    /// The CA the server's certificate comes from, when it speaks TLS
    /// (then [`TestServer::user`] goes over HTTPS).
    ca: Option<PathBuf>,
    /// The lines the server printed on stdout after `tern ready`.
    stdout: mpsc::Receiver<String>,
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
            .args(["--admin-token", ADMIN])
            .args(
                ["--log", "tern=warn"]
                    .iter()
                    .filter(|_| !args.iter().any(|a| a == "--log")),
            )
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
                let _ = tx.send(line);
            }
        });
        let ready = Instant::now() + Duration::from_secs(60);
        let line = loop {
            match rx.recv_timeout(ready.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("tern ready") => break line,
                Ok(_) => continue,
                Err(_) => {}
            }
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            panic!("server did not become ready; log:\n{log}");
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
            ca: None,
            stdout: rx,
        }
    }

    /// Starts a server on `dir` speaking TLS on both listeners, with the
    /// certificate and key in `pki` (from `Pki::write`); `ca.pem` there is
    /// what clients trust.
    pub fn start_tls(dir: &Path, pki: &Path, args: &[&str]) -> TestServer {
        let (cert, key) = (pki.join("cert.pem"), pki.join("key.pem"));
        let mut all = vec![
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let mut server = TestServer::start_with(dir, &all);
        server.ca = Some(pki.join("ca.pem"));
        server
    }

    /// Waits for the server to print a line starting with `prefix` on
    /// stdout (lines before it are skipped); panics after `within`.
    #[track_caller]
    pub fn wait_stdout(&self, prefix: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            match self
                .stdout
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(e) => panic!("no {prefix:?} on the server's stdout: {e}"),
            }
        }
    }

    /// The server's pid; panics if it is not running (a pid of 0 given to
    /// kill(2) would signal the whole process group).
    #[track_caller]
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the server is not running")
    }

    /// What the server is doing, for a test whose request it did not
    /// answer: each thread's name, state and kernel stack (where `/proc`
    /// shows it), and the last lines of its log.
    pub fn dump(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return "the server is not running".into();
        };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        for task in tasks.into_iter().flatten().flatten() {
            let path = task.path();
            let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
            let state = read("stat");
            let state = state
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            let _ = writeln!(
                out,
                "thread {} {} {}",
                read("comm").trim(),
                state.unwrap_or("?"),
                read("stack")
                    .lines()
                    .take(6)
                    .collect::<Vec<_>>()
                    .join(" < ")
            );
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let _ = writeln!(out, "server.log, last lines:");
        for line in tail.into_iter().rev() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    /// `/metrics`, or a panic with [`TestServer::dump`] if the server does
    /// not answer within 20 s.
    #[track_caller]
    pub fn metrics(&self) -> Metrics {
        let r = request("GET", "/metrics")
            .timeout(Duration::from_secs(20))
            .try_send(self.http);
        match r {
            Ok(r) if r.status == 200 => Metrics::parse(&r.text()),
            Ok(r) => panic!("GET /metrics: {} {}", r.status, r.text()),
            Err(e) => panic!("GET /metrics: {e}\n{}", self.dump()),
        }
    }

    /// SIGKILL, and wait until the process is gone. Does nothing if it is
    /// not running.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        // Still in `self.child` while we wait: a panic here kills it on drop.
        let exited = wait_for(Duration::from_secs(30), "exit after SIGTERM", || {
            let child = self.child.as_mut().expect("running");
            child.try_wait().expect("wait")
        });
        self.child = None;
        (exited, started.elapsed())
    }

    /// Starts the server again on the same data directory, after a SIGKILL
    /// if it is still running.
    pub fn restart(&mut self) {
        self.sigkill();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let ca = self.ca.take();
        *self = TestServer::start_with(&self.dir.clone(), &args);
        self.ca = ca;
    }

    /// Resident memory of the server process, KiB; panics if it cannot be
    /// read, so that a bound on it cannot pass on a 0.
    #[track_caller]
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid();
        vm_rss_kib(pid).unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
    }

    /// Creates a user through the admin API; returns its token.
    pub fn user(&self, address: &str) -> String {
        if let Some(ca) = &self.ca {
            let v: serde_json::Value = https_agent(ca, self.http)
                .post(&https_url(self.http, "/v1/users"))
                .set("Authorization", &format!("Bearer {ADMIN}"))
                .send_json(serde_json::json!({ "address": address }))
                .expect("create a user over HTTPS")
                .into_json()
                .expect("json");
            return v["token"].as_str().expect("token").to_owned();
        }
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

/// Starts `tern serve` on `dir` without an admin token (so it generates
/// one into `dir/admin.token`), on 127.0.0.1:0; returns the child and its
/// HTTP address once it is ready. Kill it by pid when done.
pub fn start_without_admin_token(dir: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir)
        .env_remove("TERN_ADMIN_TOKEN")
        .env_remove("TERN_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tern");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the ready line");
    let http = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("http_listen="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no http_listen in {line:?}")
        });
    (child, http)
}

/// An HTTPS client trusting `ca`, that reaches `https://localhost:PORT`
/// (the name the test certificates carry) at `http`.
pub fn https_agent(ca: &Path, http: SocketAddr) -> ureq::Agent {
    let name = format!("localhost:{}", http.port());
    ureq::AgentBuilder::new()
        .tls_config(tern::client::tls_config(ca).expect("CA file"))
        .resolver(move |netloc: &str| -> io::Result<Vec<SocketAddr>> {
            assert_eq!(netloc, name, "this agent only reaches the test server");
            Ok(vec![http])
        })
        .build()
}

/// `path` on the HTTPS listener at `http`, by the certificate's name.
pub fn https_url(http: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", http.port())
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// VmRSS of a process, KiB; `None` if /proc does not say (the process is
/// gone). Tests go through [`TestServer::rss_kib`]; a sampler thread, which
/// cannot borrow the server, calls this with its pid.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Milliseconds since the Unix epoch (the server's clock: `core::now_ms`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A loopback port held by a bound, non-listening socket: connections to
/// it are refused, and no other socket can bind it (not even a `bind(0)`,
/// which skips ports in use) until the socket is dropped. `port` 0 takes a
/// free one; another is bound with `SO_REUSEADDR`, so that the TIME_WAIT
/// connections of a process just killed do not stand in the way.
pub fn reserve_port(port: u16) -> (socket2::Socket, SocketAddr) {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    s.set_reuse_address(port != 0).expect("SO_REUSEADDR");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    let addr = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("a bound address");
    (s, addr)
}

/// Polls `poll` every 20 ms until it gives a value, or panics after
/// `within` naming `what`. For waiting on a state change the test cannot be
/// told about; never for proving that something does *not* happen.
#[track_caller]
pub fn wait_for<T>(within: Duration, what: &str, mut poll: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = poll() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Protocol events
// ---------------------------------------------------------------------------

/// Receives the next event within `secs`, or panics.
#[track_caller]
pub fn next(c: &mut Client, secs: u64) -> Event {
    // A `match`, not a closure, so that #[track_caller] names the caller.
    match c.recv_timeout(Duration::from_secs(secs)) {
        Ok(Some(event)) => event,
        Ok(None) => panic!("{}: no event within {secs} s", c.address),
        Err(e) => panic!("{}: {e}", c.address),
    }
}

/// The MSG in `e`, or a panic.
#[track_caller]
pub fn msg(e: Event) -> Message {
    match e {
        Event::Msg(m) => m,
        other => panic!("expected MSG, got {other:?}"),
    }
}

/// The STATUS in `e`, or a panic.
#[track_caller]
pub fn status(e: Event) -> StatusEvent {
    match e {
        Event::Status(s) => s,
        other => panic!("expected STATUS, got {other:?}"),
    }
}

/// Marker IDs start here, far above the IDs tests give their own messages.
static NEXT_MARKER: AtomicU64 = AtomicU64::new(1 << 60);

/// A marker message for user `to`: stored (default expiry), PRIORITY 15 so
/// that it is delivered after anything queued before it at any priority, no
/// receipts, and an ID and payload no other message has.
pub fn marker(to: &str) -> Outgoing {
    let id = NEXT_MARKER.fetch_add(1, Ordering::Relaxed);
    Outgoing::to(to, format!("marker {id}").as_bytes())
        .id(id)
        .priority(15)
        .flags(0)
}

/// A marker message for every member of `group` (see [`marker`]).
pub fn group_marker(group: &str) -> Outgoing {
    let id = NEXT_MARKER.fetch_add(1, Ordering::Relaxed);
    Outgoing::to_group(group, format!("marker {id}").as_bytes())
        .id(id)
        .priority(15)
        .flags(0)
}

/// Whether `m` is the delivery of `marker` sent by `from`.
pub fn is_marker(m: &Message, from: &str, marker: &Outgoing) -> bool {
    m.id == marker.id && m.from == from && m.payload == marker.payload
}

/// Sends `n` messages, `make(i)` for `i` in `0..n`, pipelined: in batches
/// of `batch`, at most `window` unanswered, calling `after_batch(sent)`
/// after each batch is written. Returns how many were answered SENT; an
/// answer other than SENT or OVERLOADED panics.
#[track_caller]
pub fn send_pipelined(
    c: &mut Client,
    n: u64,
    (batch, window): (u64, u64),
    mut make: impl FnMut(u64) -> Outgoing,
    mut after_batch: impl FnMut(u64),
) -> u64 {
    let (mut sent, mut answered, mut accepted) = (0u64, 0u64, 0u64);
    while answered < n {
        if sent < n && sent - answered + batch <= window {
            let out: Vec<Outgoing> = (sent..n.min(sent + batch)).map(&mut make).collect();
            sent += out.len() as u64;
            c.send_many(&out).unwrap();
            after_batch(sent);
            continue;
        }
        let s = status(next(c, 30));
        match s.status {
            StatusCode::SENT => accepted += 1,
            StatusCode::OVERLOADED => {}
            other => panic!("message {}: {other:?}", s.id),
        }
        answered += 1;
    }
    accepted
}

/// Receives `n` MSGs, ACKing them `ack_every` at a time (and the rest at
/// the end); panics on anything else, or on an ID delivered twice. Returns
/// the IDs.
#[track_caller]
pub fn receive_all(c: &mut Client, n: u64, ack_every: usize) -> HashSet<u64> {
    let mut seen = HashSet::new();
    let mut seqs = Vec::new();
    while (seen.len() as u64) < n {
        let m = msg(next(c, 30));
        assert!(seen.insert(m.id), "message {} delivered twice", m.id);
        seqs.push(m.seq);
        if seqs.len() == ack_every {
            c.ack(&seqs).unwrap();
            seqs.clear();
        }
    }
    c.ack(&seqs).unwrap();
    seen
}

/// The marker barrier, for proving that nothing else reaches `to`: `from`
/// sends a [`marker`] to `to`, which must be the very next event `to` sees
/// (it is then ACKed, and returned).
///
/// Why this proves it: the commit thread is one FIFO, and `to`'s session
/// delivers in (PRIORITY, SEQ) order whatever it holds, stored or live. So
/// every item queued for `to` before the marker was committed comes out
/// first, and the marker's PRIORITY 15 puts it behind items of every
/// priority. The action under test must have reached the server before the
/// marker: a connection's frames are handled in order, so a marker from the
/// connection that acted (or one that has seen a PONG) is enough.
#[track_caller]
pub fn barrier(from: &mut Client, to: &mut Client) -> Message {
    let mark = marker(&to.address);
    assert_eq!(
        from.send_wait(&mark).expect("send marker"),
        StatusCode::SENT,
        "marker to {}",
        to.address
    );
    match next(to, 10) {
        Event::Msg(m) if is_marker(&m, &from.address, &mark) => {
            to.ack(&[m.seq]).expect("ack");
            m
        }
        other => panic!("{}: expected the marker, got {other:?}", to.address),
    }
}

/// [`barrier`] with `c` sending the marker to itself (the server lets a user
/// send to its own address). Besides the marker's MSG, `c` gets the SENT
/// answer for it, which travels another way (straight from the commit
/// thread to the event loop) and may come before or after the MSG; nothing
/// else may come before the MSG.
#[track_caller]
pub fn barrier_self(c: &mut Client) -> Message {
    let mark = marker(&c.address);
    c.send(&mark).expect("send marker");
    let (mut answered, mut delivered) = (false, None);
    while !answered || delivered.is_none() {
        match next(c, 10) {
            Event::Status(s) if !answered && s.seq.is_none() && s.id == mark.id => {
                assert_eq!(s.status, StatusCode::SENT, "marker answer");
                answered = true;
            }
            Event::Msg(m) if delivered.is_none() && is_marker(&m, &c.address, &mark) => {
                c.ack(&[m.seq]).expect("ack");
                delivered = Some(m);
            }
            other => panic!("{}: expected the marker, got {other:?}", c.address),
        }
    }
    delivered.expect("marker")
}

/// Runs [`send_burst`] and SIGKILLs `server` once half of `msgs` are
/// answered SENT; asserts that the kill cut the burst short, and returns the
/// IDs answered SENT before it.
pub fn kill_mid_burst(
    server: &mut TestServer,
    client: &mut Client,
    msgs: &[Outgoing],
    window: usize,
) -> HashSet<u64> {
    let n = msgs.len();
    let acknowledged = send_burst(client, msgs, window, |sent| {
        if sent == n / 2 {
            server.sigkill();
        }
    });
    eprintln!(
        "{} of {n} answered SENT before the SIGKILL",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() < n,
        "the SIGKILL did not cut the burst short: all {n} answered SENT"
    );
    acknowledged
}

/// Sends `msgs` (each with an ID) pipelined, at most `window` unanswered at
/// once, until every one is answered or the connection breaks; returns the
/// IDs answered SENT. Any other event panics. `on_sent` runs after each SENT
/// with the number so far (the crash tests SIGKILL the server from it: the
/// SENDs still in flight then, and those not yet written, are cut off).
pub fn send_burst(
    client: &mut Client,
    msgs: &[Outgoing],
    window: usize,
    mut on_sent: impl FnMut(usize),
) -> HashSet<u64> {
    let mut acknowledged = HashSet::new();
    let mut written = 0;
    loop {
        while written < msgs.len() && written - acknowledged.len() < window {
            let end = msgs
                .len()
                .min(written + window.div_ceil(4))
                .min(acknowledged.len() + window);
            if client.send_many(&msgs[written..end]).is_err() {
                return acknowledged;
            }
            written = end;
        }
        if acknowledged.len() == msgs.len() {
            return acknowledged;
        }
        match client.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Event::Status(s))) if s.seq.is_none() => {
                assert_eq!(s.status, StatusCode::SENT, "message {}", s.id);
                assert!(acknowledged.insert(s.id), "message {} answered twice", s.id);
                on_sent(acknowledged.len());
            }
            Ok(Some(other)) => panic!("unexpected {other:?} during a burst"),
            Ok(None) => panic!(
                "no answer within 30 s with {} SENDs in flight",
                written - acknowledged.len()
            ),
            Err(_) => return acknowledged, // the connection broke
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// An HTTP response.
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD and 304).
    pub body: Vec<u8>,
}

impl Resp {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON, or a panic showing it.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// Asserts the status and the spec's JSON error shape with `code`.
    #[track_caller]
    pub fn expect(&self, status: u16, code: &str) {
        let body = self.text();
        assert_eq!(self.status, status, "{body}");
        let v = self.json();
        assert_eq!(v["error"], code, "{body}");
        assert!(v["message"].is_string(), "{body}");
    }
}

/// An HTTP/1.1 request, always with `Connection: close`. The one HTTP
/// client of the tests: build with [`request`], then [`HttpRequest::send`]
/// (panics on I/O errors), [`HttpRequest::try_send`], or
/// [`HttpRequest::open`] to stream a body yourself.
pub struct HttpRequest<'a> {
    method: &'a str,
    path: &'a str,
    bearer: Option<&'a str>,
    headers: Vec<(&'a str, String)>,
    body: &'a [u8],
    /// Read and write timeout of the socket.
    timeout: Duration,
    /// Local address to connect from (`None`: the system's choice).
    from: Option<std::net::IpAddr>,
}

/// Starts an HTTP request (no body, no token, 60 s timeouts).
pub fn request<'a>(method: &'a str, path: &'a str) -> HttpRequest<'a> {
    HttpRequest {
        method,
        path,
        bearer: None,
        headers: Vec::new(),
        body: &[],
        timeout: Duration::from_secs(60),
        from: None,
    }
}

impl<'a> HttpRequest<'a> {
    /// `Authorization: Bearer <token>`, if given.
    pub fn bearer(mut self, token: Option<&'a str>) -> Self {
        self.bearer = token;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// A body, with its `Content-Length`.
    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = body;
        self.header("Content-Length", body.len().to_string())
    }

    /// A JSON body (`Content-Type: application/json`, `Content-Length`).
    pub fn json(self, body: &'a str) -> Self {
        self.header("Content-Type", "application/json")
            .body(body.as_bytes())
    }

    /// The socket's read and write timeout.
    /// Connects from local address `ip` (another loopback address, so that
    /// per-address limits see another client).
    pub fn from(mut self, ip: &str) -> Self {
        self.from = Some(ip.parse().expect("an IP address"));
        self
    }

    /// Read and write timeout of the socket (60 s unless set).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The request line and headers.
    pub fn head(&self) -> Vec<u8> {
        let mut h = format!(
            "{} {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n",
            self.method, self.path
        );
        if let Some(t) = self.bearer {
            h.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in &self.headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("\r\n");
        h.into_bytes()
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let s = tern::client::connect(addr, self.from, self.timeout)?;
        s.set_read_timeout(Some(self.timeout))?;
        s.set_write_timeout(Some(self.timeout))?;
        Ok(s)
    }

    /// Only connects (with the timeouts set): the caller writes it all.
    pub fn connect_only(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.connect(addr)
    }

    /// Connects and writes the head; the caller writes the body and reads
    /// the answer with [`read_resp`].
    pub fn open(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let mut s = self.connect(addr)?;
        s.write_all(&self.head())?;
        Ok(s)
    }

    /// Sends the request (head and body in one write) and reads the answer.
    pub fn try_send(&self, addr: SocketAddr) -> io::Result<Resp> {
        let mut s = self.connect(addr)?;
        let mut bytes = self.head();
        bytes.extend_from_slice(self.body);
        s.write_all(&bytes)?;
        read_resp(s, self.method == "HEAD")
    }

    /// Sends the request and reads the answer; panics on an I/O error.
    #[track_caller]
    pub fn send(&self, addr: SocketAddr) -> Resp {
        self.try_send(addr)
            .unwrap_or_else(|e| panic!("{} {}: {e}", self.method, self.path))
    }
}

/// The JSON API in one call: `(status, body)`; panics on an I/O error.
#[track_caller]
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let r = request(method, path).bearer(bearer).json(body).send(addr);
    (r.status, r.text())
}

/// Reads a status line and headers. A connection closed before a status
/// line is `UnexpectedEof`.
pub fn read_head(r: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Ok((status, headers))
}

/// Reads a whole response (`head_only` for HEAD: no body is read).
pub fn read_resp(r: impl Read, head_only: bool) -> io::Result<Resp> {
    let mut r = BufReader::new(r);
    let (status, headers) = read_head(&mut r)?;
    let mut body = Vec::new();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    match len {
        _ if head_only || status == 304 => {}
        Some(n) => {
            r.by_ref().take(n).read_to_end(&mut body)?;
            if body.len() as u64 != n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short body: {} of {n} bytes", body.len()),
                ));
            }
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// Writes `bytes` as they are, shuts the write side (a server waiting for
/// more sees EOF) and returns all the server sends until it closes (or
/// resets: what came before counts). Panics if it does neither within 30 s.
#[track_caller]
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The server may answer and close before it has read everything.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("no answer and no close within 30 s")
            }
            Err(_) => return got,
        }
    }
}

/// [`raw_exchange`], parsed: the first response, or `Err(UnexpectedEof)`
/// if the server closed without answering.
#[track_caller]
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> io::Result<Resp> {
    read_resp(&raw_exchange(addr, bytes)[..], false)
}

/// One scrape of `/metrics`, parsed as Prometheus text.
pub struct Metrics(prometheus_parse::Scrape);

/// Scrapes `/metrics`; panics unless it is 200 and valid Prometheus text.
#[track_caller]
pub fn scrape(addr: SocketAddr) -> Metrics {
    let (code, body) = http(addr, "GET", "/metrics", None, "");
    assert_eq!(code, 200, "{body}");
    Metrics::parse(&body)
}

impl Metrics {
    /// Parses the Prometheus text format.
    #[track_caller]
    pub fn parse(body: &str) -> Metrics {
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        Metrics(prometheus_parse::Scrape::parse(lines).expect("Prometheus text"))
    }

    /// The value of a counter, gauge or untyped sample called `name`.
    #[track_caller]
    pub fn value(&self, name: &str) -> f64 {
        use prometheus_parse::Value;
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                _ => panic!("{name} is not a counter or gauge"),
            })
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }

    /// Whether any sample is called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.0.samples.iter().any(|s| s.metric == name)
    }
}
