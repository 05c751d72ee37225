//! The SDK when the *app* is SIGKILLed: issue 10's acceptance items 2
//! (sending app), 3 (receiving app) and 6 (an upload cut half-way).
//!
//! The app is this very test binary, run again with `TERN_SDK_APP` set to
//! a role: it then runs only [`app_process`], which opens the SDK on a
//! store file and works until its job is done. So `cargo test --release`
//! needs no extra build step. The test SIGKILLs the app (by pid) at random
//! points of its progress, which it reads from the app's store file (SQLite
//! allows a reader in another process), and starts it again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tern_sdk::{Direction, Draft, Event, Peer, Status, Store};

use crate::proxy::Proxy;
use crate::sdk::{config, duplicates, incoming, noise_file, open, outgoing, sha256_file, texts};
use crate::util::{http, wait_for, TestServer, ADMIN};

/// The environment variable that selects the app role.
pub(crate) const ROLE: &str = "TERN_SDK_APP";
/// How long one app run may take at most.
const APP_DEADLINE: Duration = Duration::from_secs(120);
/// How long a run may go without the progress the test waits for.
pub(crate) const STALL: Duration = Duration::from_secs(30);

/// The app process of the crash tests (not a test of its own: without
/// `TERN_SDK_APP` it returns at once). Roles:
/// - `sender`: queues `TERN_SDK_N` texts `s0000…` to `TERN_SDK_PEER`,
///   continuing after what an earlier run queued, then waits until all are
///   DELIVERED;
/// - `receiver`: waits until `TERN_SDK_N` messages are stored;
/// - `uploader`: sends `TERN_SDK_FILE` (once) and waits until DELIVERED.
#[test]
#[ignore = "the app process of the SDK crash tests, which run it with TERN_SDK_APP set"]
fn app_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let addr: SocketAddr = var("TERN_SDK_ADDR").parse().expect("TERN_SDK_ADDR");
    let mut cfg = config(addr, &var("TERN_SDK_TOKEN"), var("TERN_SDK_DB").into());
    if let Ok(h) = std::env::var("TERN_SDK_HTTP") {
        cfg = cfg.http(h);
    }
    let n: u64 = std::env::var("TERN_SDK_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tern, events) = open(cfg);
    let store = tern.store();
    let deadline = Instant::now() + APP_DEADLINE;
    let done: Box<dyn Fn() -> bool> = match role.as_str() {
        "sender" => {
            let peer = Peer::user(var("TERN_SDK_PEER"));
            let queued = store.count(Direction::Outgoing, None).unwrap();
            for i in queued..n {
                tern.send(Draft::text(peer.clone(), &format!("s{i:04}")))
                    .unwrap();
                // The power-cut test holds the store to what was queued.
                eprintln!("queued s{i:04}");
            }
            Box::new(|| outgoing(store, Status::Delivered) == n)
        }
        "receiver" => Box::new(|| incoming(store) >= n),
        "uploader" => {
            if store.count(Direction::Outgoing, None).unwrap() == 0 {
                let file = PathBuf::from(var("TERN_SDK_FILE"));
                tern.send_file(Peer::user(var("TERN_SDK_PEER")), &file, Some("half way"))
                    .unwrap();
            }
            Box::new(|| outgoing(store, Status::Delivered) == 1)
        }
        other => panic!("unknown role {other}"),
    };
    // Check after every event, and at least every 100 ms.
    while !done() {
        assert!(Instant::now() < deadline, "{role}: not done in time");
        if let Some(e @ (Event::Connection(_) | Event::Upload { .. } | Event::Lagged)) =
            events.recv_timeout(Duration::from_millis(100))
        {
            eprintln!("{role}: {e:?}")
        }
    }
    drop(done);
    tern.shutdown();
}

/// How to start the app.
pub(crate) struct AppSpec {
    pub(crate) role: &'static str,
    pub(crate) env: Vec<(&'static str, String)>,
    /// Its stderr goes here (appended), for post-mortems.
    pub(crate) log: PathBuf,
}

impl AppSpec {
    pub(crate) fn spawn(&self) -> App {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("app log");
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "sdk_crash::app_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(ROLE, self.role)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the app");
        App {
            child: Some(child),
            log: self.log.clone(),
        }
    }
}

/// A running app process; SIGKILLed (by pid) on drop.
pub(crate) struct App {
    child: Option<Child>,
    /// Its stderr, shown when it fails.
    log: PathBuf,
}

impl App {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("try_wait")
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the exit, at most `within`; `None` (after a SIGKILL) if
    /// the app was still running, so that the caller can show what its
    /// store lacks before failing.
    pub(crate) fn finish(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`App::finish`], which must end in exit 0 (else a panic showing the
    /// app's log).
    #[track_caller]
    pub(crate) fn expect_success(&mut self, within: Duration) {
        let status = self.finish(within);
        if !status.is_some_and(|s| s.success()) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("the app ended with {status:?} (None: still running after {within:?}); its log:\n{log}");
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the app again and again, SIGKILLing it each time once `progress`
/// (read from its store) reaches a random target a little ahead of where
/// it started, until it was killed `kills` times while work remained. The
/// caller then starts the last run and checks the outcome.
fn crash_loop(
    app: &AppSpec,
    store: &Store,
    progress: impl Fn(&Store) -> u64,
    total: u64,
    kills: usize,
) {
    let mut rng = rand::rng();
    let mut killed = 0;
    let mut runs = 0;
    while killed < kills {
        runs += 1;
        assert!(runs <= kills * 3, "only {killed} kills in {runs} runs");
        let from = progress(store);
        assert!(from + 1 < total, "the work ran out after {killed} kills");
        // On average the kills left share what is left evenly, short of a
        // last quarter kept back: the store is polled, and a fast app
        // overshoots its target (by 298 of 4,000 once, which used up the
        // work before the tenth kill).
        let kills_left = (kills - killed) as u64;
        let room = (total - from).saturating_sub(total / 4);
        let gap = (2 * room / (kills_left + 1)).max(1);
        let target = (from + rng.random_range(1..=gap)).min(total - 1);
        let mut run = app.spawn();
        let deadline = Instant::now() + STALL;
        // Polls the store: the app cannot tell us about its progress.
        let reached = loop {
            if let Some(status) = run.try_wait() {
                assert!(
                    status.success(),
                    "the app failed: {status}; see {:?}",
                    app.log
                );
                break false;
            }
            if progress(store) >= target {
                break true;
            }
            assert!(
                Instant::now() < deadline,
                "{}: stalled at {} of {total} (target {target})",
                app.role,
                progress(store)
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        if reached {
            run.kill();
            killed += 1;
            eprintln!(
                "{}: SIGKILL {killed} at {} of {total} (target {target})",
                app.role,
                progress(store)
            );
        }
    }
}

/// Acceptance 3: the receiving app is SIGKILLed at random points while it
/// receives 2,000 messages, 10 times; after the restarts its store has
/// every message exactly once, in order, and the server's queue for it is
/// empty.
#[test]
fn receiving_app_sigkilled_ten_times_stores_each_message_once() {
    const N: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let db = dir.path().join("bob.db");
    let store = Store::open(&db).unwrap();
    // alice's SDK queues the 2,000 and sends them while bob's app comes
    // and goes; a window of 2 makes them trickle in, so that the kills
    // fall at many points of bob's receive loop, not between two bursts.
    let (alice, _alice_events) =
        open(config(server.addr, &alice_token, dir.path().join("a.db")).window(2));
    let want: Vec<String> = (0..N).map(|i| format!("r{i:04}")).collect();
    for t in &want {
        alice.send(Draft::text(Peer::user("bob"), t)).unwrap();
    }
    let app = AppSpec {
        role: "receiver",
        env: vec![
            ("TERN_SDK_ADDR", server.addr.to_string()),
            ("TERN_SDK_TOKEN", bob_token),
            ("TERN_SDK_DB", db.display().to_string()),
            ("TERN_SDK_N", N.to_string()),
        ],
        log: dir.path().join("receiver.log"),
    };
    crash_loop(&app, &store, incoming, N, 10);
    // The last run. Once alice's store says bob ACKed every message, bob's
    // store must hold every one.
    let mut last = app.spawn();
    wait_for(STALL, "alice: all DELIVERED", || {
        (outgoing(alice.store(), Status::Delivered) == N).then_some(())
    });
    let got = texts(&store, &Peer::user("alice"));
    assert_eq!(duplicates(&got), [], "no message stored twice");
    assert_eq!(got.len(), N as usize, "every message stored");
    assert_eq!(got, want, "in order");
    let pending = wait_for(Duration::from_secs(10), "bob's queue to empty", || {
        let (code, body) = http(server.http, "GET", "/v1/users/bob", Some(ADMIN), "");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (v["pending"] == 0).then_some(v)
    });
    assert_eq!(pending["pending"], 0);
    last.expect_success(STALL);
    alice.shutdown();
}

/// Acceptance 2: the sending app is SIGKILLed at random points while it
/// queues and sends 2,000 messages, 10 times; after the restarts the
/// recipient has every message exactly once (in order), and the sender's
/// store shows every one DELIVERED.
#[test]
fn sending_app_sigkilled_ten_times_delivers_each_message_once() {
    const N: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let db = dir.path().join("alice.db");
    let store = Store::open(&db).unwrap();
    let (bob, _bob_events) = open(config(server.addr, &bob_token, dir.path().join("b.db")));
    let app = AppSpec {
        role: "sender",
        env: vec![
            ("TERN_SDK_ADDR", server.addr.to_string()),
            ("TERN_SDK_TOKEN", alice_token),
            ("TERN_SDK_DB", db.display().to_string()),
            ("TERN_SDK_PEER", "bob".into()),
            ("TERN_SDK_N", N.to_string()),
        ],
        log: dir.path().join("sender.log"),
    };
    // Progress: queued, then delivered (0 … 2N).
    let progress =
        |s: &Store| s.count(Direction::Outgoing, None).unwrap() + outgoing(s, Status::Delivered);
    crash_loop(&app, &store, progress, 2 * N, 10);
    // The last run ends when all are DELIVERED; if it cannot, the stores
    // below show what is missing.
    let ended = app.spawn().finish(STALL);

    let want: Vec<String> = (0..N).map(|i| format!("s{i:04}")).collect();
    assert_eq!(texts(&store, &Peer::user("bob")), want, "queued once each");
    assert_eq!(outgoing(&store, Status::Delivered), N, "all DELIVERED");
    let stored = || incoming(bob.store());
    if ended.is_some() {
        wait_for(Duration::from_secs(10), "bob stores all", || {
            (stored() >= N).then_some(())
        });
    }
    let got = texts(bob.store(), &Peer::user("alice"));
    assert_eq!(duplicates(&got), [], "no message delivered twice");
    assert_eq!(got, want, "every message, in order");
    assert!(
        ended.is_some_and(|s| s.success()),
        "the last run: {ended:?}"
    );
    bob.shutdown();
}

/// Acceptance 6: a 50 MiB file sent through the SDK arrives byte-identical
/// (sha256) and downloads so, although the sending app was SIGKILLed with
/// the upload half-way: after the restart the upload starts again for the
/// same message and id. (Corrupted downloads: `sdk.rs`.)
#[test]
fn fifty_mib_attachment_survives_a_sender_killed_mid_upload() {
    const SIZE: u64 = 50 << 20;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let file = dir.path().join("big.bin");
    let sha = noise_file(&file, SIZE);
    let files = Proxy::start(server.http);
    let db = dir.path().join("alice.db");
    let store = Store::open(&db).unwrap();
    let (bob, _be) = open(
        config(server.addr, &bob_token, dir.path().join("b.db"))
            .http(format!("http://{}", server.http)),
    );
    let app = AppSpec {
        role: "uploader",
        env: vec![
            ("TERN_SDK_ADDR", server.addr.to_string()),
            ("TERN_SDK_HTTP", files.url()),
            ("TERN_SDK_TOKEN", alice_token),
            ("TERN_SDK_DB", db.display().to_string()),
            ("TERN_SDK_PEER", "bob".into()),
            ("TERN_SDK_FILE", file.display().to_string()),
        ],
        log: dir.path().join("uploader.log"),
    };

    // Half-way through the body, the proxy SIGKILLs the app (by pid).
    let pid = Arc::new(AtomicU32::new(0));
    let target = Arc::clone(&pid);
    files.on_upstream_bytes(SIZE / 2, move || {
        let pid = target.load(Ordering::Acquire);
        assert_ne!(pid, 0);
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    let mut run = app.spawn();
    pid.store(run.pid(), Ordering::Release);
    let status = run.finish(APP_DEADLINE);
    assert!(
        status.is_some_and(|s| !s.success()),
        "the app should have been killed: {status:?}"
    );
    let cut = store.outbox().unwrap();
    assert_eq!(cut.len(), 1);
    assert_eq!(
        cut[0].status,
        Status::Uploading,
        "killed before the upload ended"
    );

    files.clear_hook();
    app.spawn().expect_success(APP_DEADLINE);
    let sent = store.all_messages(&Peer::user("bob")).unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].lid, sent[0].id),
        (cut[0].lid, cut[0].id),
        "the same message"
    );
    assert_eq!(sent[0].status, Status::Delivered);

    wait_for(Duration::from_secs(30), "bob stores it", || {
        (incoming(bob.store()) == 1).then_some(())
    });
    let m = bob
        .store()
        .all_messages(&Peer::user("alice"))
        .unwrap()
        .remove(0);
    assert_eq!(m.id, cut[0].id);
    let a = m.attachment().expect("an attachment");
    assert_eq!(
        (
            a.name.as_str(),
            a.size,
            a.sha256.as_str(),
            a.caption.as_deref()
        ),
        ("big.bin", SIZE, sha.as_str(), Some("half way"))
    );
    let path = bob.download(&m).unwrap();
    assert_eq!(sha256_file(&path), (sha, SIZE), "byte-identical");
    assert!(Path::new(&path).starts_with(dir.path()));
    bob.shutdown();
}
