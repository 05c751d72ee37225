//! SDK benchmark: what the local store costs, how fast one SDK receiver
//! stores and ACKs, and end-to-end latency SDK → server → SDK at half of
//! the sender's own maximum.
//!
//! ```text
//! cargo build --release && cargo run --release -p tern-sdk --example sdkbench -- --messages 20000
//! ```
//!
//! Starts `target/release/tern` (or `--tern PATH`) on 127.0.0.1 with a
//! temporary data directory. Payloads are 100 bytes. Figures are printed;
//! nothing is asserted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern::client::{Client, Event as WireEvent, Outgoing};
use tern::wire::StatusCode;
use tern_sdk::{Config, Draft, Event, Peer, Status, Tern};

const ADMIN: &str = "sdkbench-admin-token";

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map_or(default, |v| v.parse().expect(name))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// `POST /v1/users`; returns the token.
fn create_user(http: SocketAddr, address: &str) -> String {
    let body = format!("{{\"address\":\"{address}\"}}");
    let mut s = TcpStream::connect(http).expect("http");
    write!(
        s,
        "POST /v1/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
        .split("\"token\":\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap_or_else(|| panic!("no token in {answer}"))
        .to_owned()
}

/// p50/p99/max of `v` (µs), as ms.
fn quantiles(mut v: Vec<u64>) -> String {
    v.sort_unstable();
    let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        q(0.5),
        q(0.99),
        q(1.0)
    )
}

fn main() {
    let n = arg("--messages", 20_000);
    let payload = "x".repeat(100);
    let tern = std::env::args()
        .skip_while(|a| a != "--tern")
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(|p| p.parent())
                .expect("target dir")
                .join("tern")
        });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(&tern)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-token", ADMIN, "--log", "warn"])
        .arg("--data-dir")
        .arg(dir.path().join("server"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", tern.display()));
    let mut ready = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    while !ready.starts_with("tern ready") {
        ready.clear();
        out.read_line(&mut ready).expect("server output");
    }
    let field = |name: &str| -> SocketAddr {
        ready
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .expect(name)
    };
    let (addr, http) = (field("listen="), field("http_listen="));
    let addr_s = addr.to_string();

    // 1. The local store: `send` while offline (each is one committed
    //    SQLite transaction, synchronous = FULL), and bytes per message.
    {
        let db = dir.path().join("offline.db");
        let mut config = Config::new("127.0.0.1:9", "nobody", &db);
        config.events_capacity = 1 << 20;
        let (sdk, _events) = Tern::open(config).expect("open");
        let started = Instant::now();
        let k = n.min(5_000);
        for _ in 0..k {
            sdk.send(Draft::text(Peer::user("bob"), &payload))
                .expect("send");
        }
        let took = started.elapsed();
        sdk.shutdown();
        let size: u64 = ["", "-wal"]
            .iter()
            .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
            .map(|m| m.len())
            .sum();
        println!(
            "local store: {k} sends offline in {:.2} s: {:.0} µs each ({:.0}/s); \
             store file + WAL {:.0} bytes per message",
            took.as_secs_f64(),
            took.as_micros() as f64 / k as f64,
            k as f64 / took.as_secs_f64(),
            size as f64 / k as f64
        );
    }

    // 2. One SDK receiver: `n` messages queued for it, then it connects and
    //    stores and ACKs them all.
    let tr = create_user(http, "receiver");
    let ts = create_user(http, "sender");
    {
        let mut sender = Client::connect(addr, &ts).expect("login");
        let (mut sent, mut answered) = (0u64, 0u64);
        while answered < n {
            while sent < n && sent - answered < 2000 {
                let m = Outgoing::to("receiver", payload.as_bytes())
                    .id(sent + 1)
                    .flags(0);
                sender.send(&m).expect("send");
                sent += 1;
            }
            if let WireEvent::Status(s) = sender.recv().expect("recv") {
                assert_eq!(s.status, StatusCode::SENT);
                answered += 1;
            }
        }
        let started = Instant::now();
        let mut config = Config::new(addr_s.clone(), tr.clone(), dir.path().join("receiver.db"));
        config.events_capacity = 1 << 20;
        let (sdk, events) = Tern::open(config).expect("open");
        let mut got = 0;
        while got < n {
            if let Event::Received(_) = events.recv().expect("event") {
                got += 1;
            }
        }
        let took = started.elapsed();
        println!(
            "one SDK receiver: {n} queued messages stored and ACKed in {:.2} s: {:.0} msgs/s",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64()
        );
        sdk.shutdown();
    }

    // 3. SDK → server → SDK: the sender's own maximum (until every message
    //    is SENT), then paced at half of it, latency from `send` to the
    //    receiver's Received event.
    // Channels large enough that no event is dropped (Event::Lagged).
    let mut config = Config::new(addr_s.clone(), ts.clone(), dir.path().join("sender.db"));
    config.events_capacity = 1 << 20;
    let (sender, sender_events) = Tern::open(config).expect("open");
    let mut config = Config::new(addr_s.clone(), tr.clone(), dir.path().join("receiver2.db"));
    config.events_capacity = 1 << 20;
    let (receiver, receiver_events) = Tern::open(config).expect("open");
    let k = n.min(5_000);
    let started = Instant::now();
    for _ in 0..k {
        sender
            .send(Draft::text(Peer::user("receiver"), &payload))
            .expect("send");
    }
    let mut sent = 0;
    while sent < k {
        if let Event::Status {
            status: Status::Sent,
            ..
        } = sender_events.recv().expect("event")
        {
            sent += 1;
        }
    }
    let max_rate = k as f64 / started.elapsed().as_secs_f64();
    let mut got = 0;
    while got < k {
        if let Event::Received(_) = receiver_events.recv().expect("event") {
            got += 1;
        }
    }
    println!("SDK sender maximum: {max_rate:.0} msgs/s (send → SENT, {k} messages)");

    let rate = (max_rate / 2.0).max(1.0);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let drain = std::thread::spawn(move || {
        let mut latencies = Vec::with_capacity(k as usize);
        while latencies.len() < k as usize {
            if let Event::Received(m) = receiver_events.recv().expect("event") {
                let sent_at: u64 = m.text().and_then(|t| t.parse().ok()).unwrap_or(0);
                latencies.push(now_us().saturating_sub(sent_at));
            }
        }
        latencies
    });
    let start = Instant::now();
    for i in 0..k {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        sender
            .send(Draft::text(Peer::user("receiver"), &now_us().to_string()))
            .expect("send");
    }
    let latencies = drain.join().unwrap();
    println!(
        "end to end at {rate:.0} msgs/s (half of the maximum), {k} messages: {}",
        quantiles(latencies)
    );
    drop(sender_events);
    sender.shutdown();
    receiver.shutdown();
    let _ = child.kill();
    let _ = child.wait();
}
