//! Durability across a power cut: what the page cache held and the disk
//! did not is lost ([`losingfs`](crate::losingfs)). The SIGKILL tests in
//! `crash.rs` cannot see a missing fsync (a killed process loses nothing
//! the kernel holds); these can.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use tern::client::{Client, Outgoing};
use tern::wire::StatusCode;

use crate::files::{download_hash, sha_hex, upload, Noise, MIB};
use crate::losingfs;
use crate::util::{
    group_marker, http, is_marker, kill_mid_burst, marker, msg, next, send_burst, status,
    TestServer, ADMIN,
};

const N: u64 = 600;
/// SENDs in flight at most; the SIGKILL comes at `N / 2` SENTs.
const WINDOW: usize = 64;

/// alice's messages to bob: IDs 1..=N, payload `m<ID>`.
fn burst() -> Vec<Outgoing> {
    (1..=N)
        .map(|i| Outgoing::to("bob", format!("m{i}").as_bytes()).id(i))
        .collect()
}

/// A backing directory, and a losing view of it mounted over a second one
/// (the server's log, `server.log`, is spared: it is the test's).
pub(crate) struct Disk {
    pub(crate) backing: tempfile::TempDir,
    pub(crate) at: tempfile::TempDir,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl Disk {
    pub(crate) fn new() -> Disk {
        Disk {
            _one_at_a_time: losingfs::one_at_a_time(),
            backing: tempfile::tempdir().unwrap(),
            at: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn mount(&self) -> losingfs::Mounted {
        losingfs::mount(self.backing.path(), self.at.path(), &["server.log"]).unwrap_or_else(|e| {
            panic!(
                "mount a FUSE file system at {} (needs /dev/fuse and root): {e}",
                self.at.path().display()
            )
        })
    }
}

/// What bob receives up to a marker alice sends now, ID → SEQ; each ID
/// once, each payload intact.
fn drain(server: &TestServer, ta: &str, tb: &str) -> HashMap<u64, u64> {
    let mut alice = server.connect(ta);
    let mark = marker("bob");
    assert_eq!(alice.send_wait(&mark).unwrap(), StatusCode::SENT);
    let mut bob: Client = server.connect(tb);
    let mut got = HashMap::new();
    loop {
        let m = msg(next(&mut bob, 10));
        if m.id == mark.id {
            return got;
        }
        assert!(
            got.insert(m.id, m.seq).is_none(),
            "id {} delivered twice",
            m.id
        );
        assert_eq!(m.payload, format!("m{}", m.id).into_bytes());
    }
}

#[track_caller]
fn assert_kept(acknowledged: &HashSet<u64>, got: &HashMap<u64, u64>, when: &str) {
    let lost: BTreeSet<u64> = acknowledged
        .iter()
        .copied()
        .filter(|id| !got.contains_key(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of the {} messages answered SENT {when} are lost: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
}

/// A burst to an offline recipient, SIGKILL part-way, then the power cut:
/// every message answered SENT is delivered after the restart, once.
/// (With the WAL written but not synced before SENT, the SIGKILL tests
/// pass and this one fails.)
#[test]
fn a_power_cut_loses_nothing_acknowledged() {
    let disk = Disk::new();
    let fs = disk.mount();
    let mut server = TestServer::start_with(disk.at.path(), &[]);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let acknowledged = kill_mid_burst(&mut server, &mut alice, &burst(), WINDOW);
    drop(alice);
    let lost = fs.cut();
    eprintln!("the cut {lost}");
    assert!(
        wal_files(disk.backing.path()) > 0,
        "no WAL written through the losing view"
    );

    let server = TestServer::start_with(disk.backing.path(), &[]);
    let got = drain(&server, &ta, &tb);
    eprintln!("{} delivered after the cut", got.len());
    assert_kept(&acknowledged, &got, "before the power cut");
}

/// Whether `path` is one of RocksDB's WAL files (`<number>.log`).
fn is_wal(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".log"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// How many WAL files `data_dir`'s store has.
fn wal_files(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("db"))
        .map(|d| d.flatten().filter(|e| is_wal(&e.path())).count())
        .unwrap_or(0)
}

/// Rounds of [`a_power_cut_after_a_restart_loses_nothing_the_restart_acknowledged`]
/// at most, and how many of them must leave WAL unsynced at their SIGKILL
/// (about two in three do). Not every unsynced write holds a SEND the
/// retry meets again: the test, with the sync at open left out, failed
/// in 4 runs of 6 after one such round, and in 9 of 10 after three.
const ROUNDS: u64 = 20;
const UNSYNCED_ROUNDS: usize = 3;

/// A SIGKILL leaves batches written to the WAL but not synced (in the
/// page cache). The restart replays them, and answers a retry of one of
/// their messages SENT as a duplicate without writing it again: so it
/// must sync those WAL files before it answers anything
/// (`store::sync_wal_files`), or a power cut then loses a message the
/// restart acknowledged. (Without that sync this test fails.)
///
/// Rounds of: a burst, SIGKILL part-way, restart on the same disk (the
/// power still on), retry of what was not answered; until three SIGKILLs
/// left some WAL unsynced. Then a SIGKILL and the power cut: every message of
/// every round is delivered, once.
#[test]
fn a_power_cut_after_a_restart_loses_nothing_the_restart_acknowledged() {
    let disk = Disk::new();
    let fs = disk.mount();
    let mut server = TestServer::start_with(disk.at.path(), &[]);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut all = HashSet::new();
    let mut unsynced_rounds = 0;
    for round in 0..ROUNDS {
        let msgs: Vec<Outgoing> = burst()
            .into_iter()
            .map(|m| {
                let id = round * N + m.id;
                Outgoing::to("bob", format!("m{id}").as_bytes()).id(id)
            })
            .collect();
        let mut alice = server.connect(&ta);
        let acknowledged = kill_mid_burst(&mut server, &mut alice, &msgs, WINDOW);
        drop(alice);
        let unsynced = fs.unsynced_bytes(is_wal);
        eprintln!("round {round}: {unsynced} bytes of WAL unsynced at the SIGKILL");
        server.restart();
        let mut alice = server.connect(&ta);
        let retry: Vec<Outgoing> = msgs
            .iter()
            .filter(|m| !acknowledged.contains(&m.id))
            .cloned()
            .collect();
        let answered = send_burst(&mut alice, &retry, WINDOW, |_| {});
        assert_eq!(answered.len(), retry.len(), "every retry is answered SENT");
        all.extend(msgs.iter().map(|m| m.id));
        unsynced_rounds += usize::from(unsynced > 0);
        if unsynced_rounds == UNSYNCED_ROUNDS {
            break;
        }
    }
    server.sigkill();
    let lost = fs.cut();
    eprintln!("the cut {lost}");

    let server = TestServer::start_with(disk.backing.path(), &[]);
    let got = drain(&server, &ta, &tb);
    assert_kept(&all, &got, "before the power cut");
    assert_eq!(
        unsynced_rounds, UNSYNCED_ROUNDS,
        "too few of {ROUNDS} SIGKILLs left WAL unsynced: this run could hardly have failed"
    );
}

/// Files on the local backend: each upload answered 201 is there after a
/// SIGKILL and a power cut, byte for byte, and its signed URL (the
/// signing key is in the data directory too) still opens it.
#[test]
fn a_power_cut_keeps_every_file_whose_upload_was_answered() {
    let disk = Disk::new();
    let fs = disk.mount();
    let mut server = TestServer::start_with(disk.at.path(), &[]);
    let alice = server.user("alice");
    let files: Vec<(Vec<u8>, serde_json::Value)> = [1, 100 * 1024, 3 * MIB]
        .into_iter()
        .enumerate()
        .map(|(seed, len)| {
            let bytes = Noise::bytes(seed as u64, len);
            let v = upload(
                server.http,
                &alice,
                Some("application/octet-stream"),
                &bytes,
            );
            (bytes, v)
        })
        .collect();
    for (_, v) in &files {
        let id = v["id"].as_str().unwrap();
        assert!(
            disk.backing.path().join("files").join(id).is_file(),
            "file {id} was not written through the losing view"
        );
    }
    server.sigkill();
    let lost = fs.cut();
    eprintln!("the cut {lost}");

    let server = TestServer::start_with(disk.backing.path(), &[]);
    for (bytes, v) in &files {
        let id = v["id"].as_str().unwrap();
        let url = v["url"].as_str().unwrap();
        for (path, auth) in [
            (format!("/v1/files/{id}"), Some(alice.as_str())),
            (url.to_owned(), None),
        ] {
            let (resp, len, sha) = download_hash(server.http, &path, auth);
            assert_eq!(resp.status, 200, "GET {path} after the cut");
            assert_eq!(
                (len, sha),
                (bytes.len() as u64, sha_hex(bytes)),
                "GET {path}"
            );
        }
    }
}

/// bob, online, receives a burst and ACKs half of it; alice sees those
/// DELIVERED; SIGKILL and the power cut. After the restart none of what
/// alice saw DELIVERED comes to bob again (the ACKs that tell a sender are
/// synced before the DELIVERED goes out), and the other half comes again,
/// flagged REDELIVERY.
#[test]
fn a_power_cut_brings_back_nothing_the_sender_saw_delivered() {
    const N: u64 = 200;
    let disk = Disk::new();
    let fs = disk.mount();
    let mut server = TestServer::start_with(disk.at.path(), &[]);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    let msgs: Vec<Outgoing> = (1..=N)
        .map(|i| Outgoing::to("bob", format!("m{i}").as_bytes()).id(i))
        .collect();
    let answered = send_burst(&mut alice, &msgs, WINDOW, |_| {});
    assert_eq!(answered.len() as u64, N);
    let mut seqs = HashMap::new();
    while (seqs.len() as u64) < N {
        let m = msg(next(&mut bob, 10));
        seqs.insert(m.id, m.seq);
    }
    bob.ack(&(1..=N / 2).map(|id| seqs[&id]).collect::<Vec<u64>>())
        .unwrap();
    let mut delivered = HashSet::new();
    while (delivered.len() as u64) < N / 2 {
        let s = status(next(&mut alice, 10));
        assert_eq!(s.status, StatusCode::DELIVERED, "{s:?}");
        delivered.insert(s.id);
    }
    server.sigkill();
    drop((alice, bob));
    let lost = fs.cut();
    eprintln!("the cut {lost}");

    let server = TestServer::start_with(disk.backing.path(), &[]);
    let mut alice = server.connect(&ta);
    let mark = marker("bob");
    assert_eq!(alice.send_wait(&mark).unwrap(), StatusCode::SENT);
    let mut bob = server.connect(&tb);
    let mut again = BTreeSet::new();
    loop {
        let m = msg(next(&mut bob, 10));
        if m.id == mark.id {
            break;
        }
        assert!(
            !delivered.contains(&m.id),
            "message {} came back after alice saw it DELIVERED",
            m.id
        );
        assert!(m.is_redelivery(), "{m:?}");
        assert_eq!(Some(&m.seq), seqs.get(&m.id), "the same SEQ");
        assert!(again.insert(m.id), "message {} twice", m.id);
    }
    assert_eq!(
        again,
        (N / 2 + 1..=N).collect::<BTreeSet<u64>>(),
        "the un-ACKed half comes again"
    );
}

/// Power cuts that keep a random part of what each file had past its last
/// sync, to the byte (a WAL record torn at the end, say): rounds on one
/// disk of a burst, SIGKILL part-way, such a cut, and a start on what it
/// left, until two cuts tore the WAL (about one round in three). The
/// server starts every time, and in the end every message answered SENT
/// in any round is delivered, once. With RocksDB's WAL recovery mode
/// `kAbsoluteConsistency` the server refuses to start after a torn cut
/// ("Corruption: truncated record body"). (`TERN_CUT_SEED` repeats a
/// run's tears.)
#[test]
fn torn_writes_at_power_cuts_lose_nothing_acknowledged() {
    /// At most; a round tears the WAL with a chance of about 0.4 (12 of
    /// 29 rounds in six runs), so 30 rounds give two with a chance of
    /// 1 - 3·10⁻⁶.
    const ROUNDS: u64 = 30;
    const TORN: usize = 2;
    let disk = Disk::new();
    let seed: u64 = std::env::var("TERN_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("TERN_CUT_SEED={seed}");
    let mut tokens = None;
    let mut acknowledged = HashSet::new();
    let mut torn = 0;
    for round in 0..ROUNDS {
        let fs = disk.mount();
        let mut server = TestServer::start_with(disk.at.path(), &[]);
        let (ta, _) = tokens.get_or_insert_with(|| (server.user("alice"), server.user("bob")));
        let msgs: Vec<Outgoing> = (1..=N)
            .map(|i| {
                let id = round * N + i;
                Outgoing::to("bob", format!("m{id}").as_bytes()).id(id)
            })
            .collect();
        let mut alice = server.connect(ta);
        acknowledged.extend(kill_mid_burst(&mut server, &mut alice, &msgs, WINDOW));
        drop(alice);
        let lost = fs.cut_with(losingfs::Tear::Random(seed.wrapping_add(round)));
        let wal: Vec<_> = lost.files.iter().filter(|f| is_wal(&f.path)).collect();
        torn += wal.iter().filter(|f| f.torn()).count();
        eprintln!("round {round}: the cut left of the WAL {wal:?}");
        if torn >= TORN {
            break;
        }
    }
    assert!(
        torn >= TORN,
        "{torn} of {ROUNDS} cuts tore the WAL: this run could hardly have failed"
    );
    let (ta, tb) = tokens.expect("tokens");
    let server = TestServer::start_with(disk.backing.path(), &[]);
    let got = drain(&server, &ta, &tb);
    assert_kept(&acknowledged, &got, "before their power cut");
}

/// A group burst to 20 members, half of them online (connected, not
/// reading: their shares are held in memory, not written as items), half
/// offline; SIGKILL part-way and the power cut. After the restart every
/// member gets every group message answered SENT, once, in send order.
#[test]
fn a_power_cut_during_a_group_burst_loses_nothing_acknowledged() {
    const N: u64 = 400;
    let disk = Disk::new();
    let fs = disk.mount();
    let mut server = TestServer::start_with(disk.at.path(), &[]);
    let names: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    let tokens: Vec<String> = names.iter().map(|n| server.user(n)).collect();
    let boss = server.user("boss");
    let members: Vec<String> = names
        .iter()
        .map(|n| format!(r#"{{"address":{n:?}}}"#))
        .chain([r#"{"address":"boss","recv":false}"#.to_string()])
        .collect();
    let (code, body) = http(
        server.http,
        "PUT",
        "/v1/groups/big",
        Some(ADMIN),
        &format!(r#"{{"members":[{}]}}"#, members.join(",")),
    );
    assert_eq!(code, 201, "{body}");
    let online: Vec<Client> = tokens[..10].iter().map(|t| server.connect(t)).collect();
    let mut sender = server.connect(&boss);
    let msgs: Vec<Outgoing> = (1..=N)
        .map(|i| Outgoing::to_group("big", &i.to_be_bytes()).id(i).flags(0))
        .collect();
    let acknowledged = kill_mid_burst(&mut server, &mut sender, &msgs, WINDOW);
    drop((online, sender));
    let lost = fs.cut();
    eprintln!("the cut {lost}");

    let server = TestServer::start_with(disk.backing.path(), &[]);
    let mut sender = server.connect(&boss);
    let mark = group_marker("big");
    assert_eq!(sender.send_wait(&mark).unwrap(), StatusCode::SENT);
    for (name, token) in names.iter().zip(&tokens) {
        let mut c = server.connect(token);
        let mut ids = Vec::new();
        loop {
            let m = msg(next(&mut c, 10));
            if is_marker(&m, "boss", &mark) {
                break;
            }
            assert_eq!(m.payload, m.id.to_be_bytes(), "{name}: {m:?}");
            ids.push(m.id);
        }
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{name}: once each, in send order: {ids:?}"
        );
        let got: HashSet<u64> = ids.into_iter().collect();
        let lost: BTreeSet<u64> = acknowledged.difference(&got).copied().collect();
        assert!(
            lost.is_empty(),
            "{name}: {} of the {} group messages answered SENT are lost: {lost:?}",
            lost.len(),
            acknowledged.len()
        );
    }
}

/// The admin token a first start generates into the data directory is
/// there after a power cut: the operator's scripts hold it.
#[test]
fn a_power_cut_keeps_the_generated_admin_token() {
    let disk = Disk::new();
    let fs = disk.mount();
    let (mut child, _) = crate::util::start_without_admin_token(disk.at.path());
    let token = std::fs::read_to_string(disk.at.path().join("admin.token")).expect("admin.token");
    let _ = child.kill();
    let _ = child.wait();
    let lost = fs.cut();
    eprintln!("the cut {lost}");
    let after = std::fs::read_to_string(disk.backing.path().join("admin.token"));
    assert_eq!(
        after.ok().as_deref(),
        Some(token.as_str()),
        "the admin token after the cut"
    );
}

/// The s3 backend: the bytes are in the bucket (moto, which does not lose
/// power here), the catalog is in the data directory. A file uploaded
/// through tern is served after the cut, and the first direct upload,
/// announced and PUT just before it (its announcement's `pending`
/// directory made then, and nothing synced the files directory since),
/// completes after it. (With that directory made by `create_dir_all`, its
/// name unsynced, the completion is 404.)
#[test]
fn a_power_cut_keeps_the_s3_catalog() {
    use crate::files_s3::{announce, complete, fetch_redirected, put};
    let disk = Disk::new();
    let store = tempfile::tempdir().unwrap();
    let moto = crate::s3::Moto::start(store.path());
    let mut args = moto.args();
    args.extend(["--files-direct".to_string(), "true".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fs = disk.mount();
    let mut server = TestServer::start_with(disk.at.path(), &args);
    let alice = server.user("alice");
    let direct = |server: &TestServer, bytes: &[u8]| -> (String, String) {
        let r = announce(
            server,
            &alice,
            &serde_json::json!({"direct": true, "size": bytes.len()}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        let url = v["upload_url"].as_str().unwrap().to_owned();
        let content_type = v["headers"]["Content-Type"].as_str().unwrap().to_owned();
        assert_eq!(put(&url, &content_type, bytes), 200);
        (v["id"].as_str().unwrap().to_owned(), url)
    };
    let proxied = Noise::bytes(41, 200 * 1024);
    let through = upload(server.http, &alice, None, &proxied);
    let announced = Noise::bytes(43, 100 * 1024);
    let (announced_id, _) = direct(&server, &announced);
    server.sigkill();
    let lost = fs.cut();
    eprintln!("the cut {lost}");

    let server = TestServer::start_with(disk.backing.path(), &args);
    let r = complete(&server, &alice, &announced_id);
    assert_eq!(
        r.status,
        201,
        "the upload announced before the cut: {}",
        r.text()
    );
    for (id, bytes) in [
        (through["id"].as_str().unwrap(), &proxied),
        (announced_id.as_str(), &announced),
    ] {
        let got = fetch_redirected(&server, &format!("/v1/files/{id}"), &alice);
        assert_eq!(sha_hex(&got), sha_hex(bytes), "file {id} after the cut");
    }
}
