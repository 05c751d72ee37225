//! Memory probe: what an idle connection and a queued message cost the
//! server, and whether memory goes back to the OS once queues drain.
//!
//! ```text
//! cargo build --release && cargo run --release --example memprobe -- --conns 5000 --queued 500000
//! ```
//!
//! Starts `target/release/tern` (or `--tern PATH`) on 127.0.0.1 with a
//! temporary data directory, and reads the server process's VmRSS from
//! `/proc` at each step:
//!
//! 1. idle, after start;
//! 2. with `--conns` logged-in connections that send nothing;
//! 3. those closed, with `--queued` messages of `--payload` bytes queued for
//!    an offline user;
//! 4. after that user has received and ACKed all of them, and 10 s of quiet.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern::client::{Client, Event, Outgoing};
use tern::wire::StatusCode;

const ADMIN: &str = "memprobe-admin-token";

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map_or(default, |v| v.parse().expect(name))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
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
    let token = answer
        .split("\"token\":\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap_or_else(|| panic!("no token in {answer}"));
    token.to_owned()
}

fn main() {
    let conns = arg("--conns", 5000) as usize;
    let queued = arg("--queued", 500_000);
    let payload = vec![0x5a; arg("--payload", 100) as usize];
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
    let _ = rlimit::increase_nofile_limit(u64::MAX);
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
        .args([
            "--max-connections-per-ip",
            "0",
            "--max-unauthenticated-per-ip",
            "0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", tern.display()));
    let pid = child.id();
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

    let idle = rss_kib(pid);
    println!("idle after start: {idle} KiB");

    let tokens: Vec<String> = (0..conns)
        .map(|i| create_user(http, &format!("u{i}")))
        .collect();
    let before = rss_kib(pid);
    let clients: Vec<Client> = tokens
        .iter()
        .map(|t| Client::connect(addr, t).expect("login"))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let with_conns = rss_kib(pid);
    println!(
        "{conns} idle logged-in connections: +{} KiB, {:.2} KiB each",
        with_conns - before,
        (with_conns - before) as f64 / conns as f64
    );
    drop(clients);
    std::thread::sleep(Duration::from_secs(2));

    let (ts, tr) = (create_user(http, "sender"), create_user(http, "receiver"));
    let before = rss_kib(pid);
    let mut sender = Client::connect(addr, &ts).expect("login");
    let window = 2000u64;
    let (mut sent, mut answered) = (0u64, 0u64);
    while answered < queued {
        while sent < queued && sent - answered < window {
            let m = Outgoing::to("receiver", &payload).id(sent + 1).flags(0);
            sender.send(&m).expect("send");
            sent += 1;
        }
        match sender.recv().expect("recv") {
            Event::Status(s) if s.status == StatusCode::SENT => answered += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(sender);
    std::thread::sleep(Duration::from_secs(2));
    let with_queue = rss_kib(pid);
    println!(
        "{queued} queued messages of {} bytes: +{} KiB, {:.1} bytes each",
        payload.len(),
        with_queue.saturating_sub(before),
        with_queue.saturating_sub(before) as f64 * 1024.0 / queued as f64
    );

    let started = Instant::now();
    let mut receiver = Client::connect(addr, &tr).expect("login");
    let mut got = 0u64;
    let mut seqs = Vec::new();
    while got < queued {
        if let Event::Msg(m) = receiver.recv().expect("recv") {
            got += 1;
            seqs.push(m.seq);
            if seqs.len() == 512 {
                receiver.ack(&seqs).expect("ack");
                seqs.clear();
            }
        }
    }
    receiver.ack(&seqs).expect("ack");
    drop(receiver);
    println!("drained in {:.1} s", started.elapsed().as_secs_f64());
    let peak = rss_kib(pid);
    std::thread::sleep(Duration::from_secs(10));
    let after = rss_kib(pid);
    println!(
        "right after the drain: {peak} KiB; 10 s later: {after} KiB (idle at start: {idle} KiB)"
    );
    let _ = child.kill();
    let _ = child.wait();
}
