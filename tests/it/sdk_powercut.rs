//! The SDK's store across a power cut ([`losingfs`](crate::losingfs)): the
//! app is SIGKILLed with its store on a losing file system, and what the
//! page cache held and the disk did not is lost. The SIGKILL tests in
//! `sdk_crash.rs` cannot see a commit that skips its fsync; these can.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;
use tern_sdk::{Draft, Peer, Status, Store};

use crate::losingfs::Tear;
use crate::powercut::Disk;
use crate::sdk::{config, duplicates, incoming, open, outgoing, texts};
use crate::sdk_crash::{AppSpec, STALL};
use crate::util::{wait_for, TestServer};

/// Power cuts per test.
const CUTS: usize = 4;

/// Runs the app with its store on the losing view, SIGKILLs it once
/// `progress` passes a random target ahead of where it started, and cuts
/// the power; `CUTS` times. Then `after_cut` looks at the store on the
/// backing directory. (Progress is read from the other end, never from
/// the app's store through the view: closing a reader there would
/// checkpoint the app's WAL before the cut.)
fn cut_loop(
    disk: &Disk,
    app: &AppSpec,
    db: &str,
    progress: impl Fn() -> u64,
    total: u64,
    after_cut: impl Fn(&Store),
) {
    let mut rng = rand::rng();
    for cut in 0..CUTS {
        let from = progress();
        if from >= total - total / 4 {
            // The app ran ahead of the progress seen (a DELIVERED lags
            // the store): the rest is the last run's.
            eprintln!("{}: {from} of {total} done after {cut} cuts", app.role);
            assert!(cut > 0, "{}: no cut made", app.role);
            return;
        }
        let fs = disk.mount();
        let left = (total - from).saturating_sub(total / 4);
        let target = from + rng.random_range(1..=(left / (CUTS - cut) as u64).max(1));
        let mut run = app.spawn();
        let deadline = Instant::now() + STALL;
        while progress() < target {
            if let Some(status) = run.try_wait() {
                panic!(
                    "the app ended ({status}) before {target}; see {:?}",
                    app.log
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: stalled short of {target}",
                app.role
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        run.kill();
        // Every other cut keeps a random part of what was not synced (a
        // torn WAL frame, say), which SQLite must recover from too.
        let tear = match cut % 2 {
            0 => Tear::Whole,
            _ => Tear::Random(rng.random()),
        };
        let lost = fs.cut_with(tear);
        eprintln!(
            "{}: cut {} ({tear:?}) at {target} of {total}: {lost}",
            app.role,
            cut + 1
        );
        after_cut(&Store::open(disk.backing.path().join(db)).unwrap());
    }
}

/// The app's env with its store at `dir/db`.
fn env_with_db(
    env: &[(&'static str, String)],
    dir: &Path,
    db: &str,
) -> Vec<(&'static str, String)> {
    let mut env = env.to_vec();
    env.push(("TERN_SDK_DB", dir.join(db).display().to_string()));
    env
}

/// The receiving app, its store on the losing disk, SIGKILLed and cut off
/// 4 times while 400 messages arrive: every message it ACKed is in its
/// store after each cut (the SDK ACKs only what a synced commit holds), so
/// in the end it has every message once, in order.
#[test]
fn the_receiving_app_keeps_what_it_acked_across_power_cuts() {
    const N: u64 = 400;
    let disk = Disk::new();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let (alice, _alice_events) =
        open(config(server.addr, &alice_token, dir.path().join("a.db")).window(2));
    let want: Vec<String> = (0..N).map(|i| format!("r{i:04}")).collect();
    for t in &want {
        alice.send(Draft::text(Peer::user("bob"), t)).unwrap();
    }
    let env = vec![
        ("TERN_SDK_ADDR", server.addr.to_string()),
        ("TERN_SDK_TOKEN", bob_token),
        ("TERN_SDK_N", N.to_string()),
    ];
    let log = dir.path().join("receiver.log");
    let on_disk = |at: &Path| AppSpec {
        role: "receiver",
        env: env_with_db(&env, at, "bob.db"),
        log: log.clone(),
    };
    // bob's progress: what alice saw DELIVERED (ACKed, so stored).
    let delivered = || outgoing(alice.store(), Status::Delivered);
    cut_loop(
        &disk,
        &on_disk(disk.at.path()),
        "bob.db",
        delivered,
        N,
        |store| {
            let stored: HashSet<String> = texts(store, &Peer::user("alice")).into_iter().collect();
            let lost: Vec<String> = alice
                .store()
                .all_messages(&Peer::user("bob"))
                .unwrap()
                .into_iter()
                .filter(|m| matches!(m.status, Status::Delivered | Status::Read))
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .filter(|t| !stored.contains(t))
                .collect();
            assert!(
                lost.is_empty(),
                "ACKed, and not in the store after the cut: {lost:?}"
            );
        },
    );

    let mut last = on_disk(disk.backing.path()).spawn();
    wait_for(STALL, "alice: all DELIVERED", || {
        (outgoing(alice.store(), Status::Delivered) == N).then_some(())
    });
    last.expect_success(STALL);
    let store = Store::open(disk.backing.path().join("bob.db")).unwrap();
    let got = texts(&store, &Peer::user("alice"));
    assert_eq!(duplicates(&got), [], "no message stored twice");
    assert_eq!(got, want, "every message ACKed is stored, once, in order");
    alice.shutdown();
}

/// The sending app, its store on the losing disk, SIGKILLed and cut off 4
/// times while it queues and sends 600 messages: every message `send`
/// returned for is in its outbox after each cut, and in the end the
/// recipient has each once, in order.
#[test]
fn the_sending_app_keeps_what_it_queued_across_power_cuts() {
    const N: u64 = 600;
    let disk = Disk::new();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let (bob, _bob_events) = open(config(server.addr, &bob_token, dir.path().join("b.db")));
    let env = vec![
        ("TERN_SDK_ADDR", server.addr.to_string()),
        ("TERN_SDK_TOKEN", alice_token),
        ("TERN_SDK_PEER", "bob".to_string()),
        ("TERN_SDK_N", N.to_string()),
    ];
    let log = dir.path().join("sender.log");
    let on_disk = |at: &Path| AppSpec {
        role: "sender",
        env: env_with_db(&env, at, "alice.db"),
        log: log.clone(),
    };
    // The app logs `queued <text>` for each `send` that returned.
    let queued_by_log = || -> HashSet<String> {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.strip_prefix("queued "))
            .map(str::to_owned)
            .collect()
    };
    // Progress: queued (by the app's log), then received by bob (0 … 2N).
    let progress = || queued_by_log().len() as u64 + incoming(bob.store());
    cut_loop(
        &disk,
        &on_disk(disk.at.path()),
        "alice.db",
        progress,
        2 * N,
        |store| {
            let stored: HashSet<String> = texts(store, &Peer::user("bob")).into_iter().collect();
            let mut lost: Vec<String> = queued_by_log()
                .into_iter()
                .filter(|t| !stored.contains(t))
                .collect();
            lost.sort();
            assert!(
                lost.is_empty(),
                "send returned, and not in the outbox after the cut: {lost:?}"
            );
        },
    );

    let ended = on_disk(disk.backing.path()).spawn().finish(STALL);
    let store = Store::open(disk.backing.path().join("alice.db")).unwrap();
    let want: Vec<String> = (0..N).map(|i| format!("s{i:04}")).collect();
    assert_eq!(texts(&store, &Peer::user("bob")), want, "queued once each");
    assert_eq!(outgoing(&store, Status::Delivered), N, "all DELIVERED");
    wait_for(Duration::from_secs(10), "bob stores all", || {
        (incoming(bob.store()) >= N).then_some(())
    });
    let got = texts(bob.store(), &Peer::user("alice"));
    assert_eq!(duplicates(&got), [], "no message delivered twice");
    assert_eq!(got, want, "every message, in order");
    assert!(
        ended.is_some_and(|s| s.success()),
        "the last run: {ended:?}"
    );
    bob.shutdown();
}
