//! Group fan-out load: one sender, a group of `--members` connected members,
//! each message delivered to all of them. Runs a tern server in this process
//! (temporary data directory, 127.0.0.1).
//!
//! ```text
//! cargo run --release --example groupload -- --members 1000 --messages 2000
//! ```
//!
//! Members are plain non-blocking sockets shared by `--threads` reader
//! threads, which decode frames with `tern::wire` and ACK everything they
//! read. Reported: deliveries/s (members × messages over the whole run) and
//! the sender's SENT latency (SEND written → STATUS SENT read; one group send
//! is one synced batch of `members` inbox items).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tern::client::{Client, Event, Outgoing};
use tern::wire::{self, Frame, Kind, StatusCode, HEADER_LEN};

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].parse().expect(name))
        .unwrap_or(default)
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("http");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bench\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn token(http_addr: SocketAddr, address: &str) -> String {
    let body = http(
        http_addr,
        "POST",
        "/v1/users",
        &format!(r#"{{"address":"{address}"}}"#),
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["token"].as_str().expect("token").to_owned()
}

/// A member socket after login, read without blocking.
struct Member {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn login(addr: SocketAddr, token: &str) -> Member {
    let client = Client::connect(addr, token).expect("login");
    let stream = client.stream().try_clone().expect("clone");
    stream.set_nonblocking(true).expect("nonblocking");
    std::mem::forget(client); // keep the socket; the clone owns it now
    Member {
        stream,
        buf: Vec::with_capacity(64 * 1024),
    }
}

fn main() {
    let members = arg("--members", 1000) as usize;
    let messages = arg("--messages", 2000);
    let window = arg("--window", 50);
    let payload = vec![0u8; arg("--payload", 100) as usize];
    let threads = arg("--threads", 2) as usize;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = tern::config::Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        admin_token: Some("bench".into()),
        ..Default::default()
    };
    let server = tern::server::Server::start(config).expect("server");
    let (addr, http_addr) = (server.listen, server.http_listen);

    let names: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
    let tokens: Vec<String> = names.iter().map(|n| token(http_addr, n)).collect();
    let boss = token(http_addr, "boss");
    let mut list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    list.push(r#"{"address":"boss","recv":false}"#.into());
    http(
        http_addr,
        "PUT",
        "/v1/groups/big",
        &format!(r#"{{"members":[{}]}}"#, list.join(",")),
    );

    let mut sockets: Vec<Member> = tokens.iter().map(|t| login(addr, t)).collect();
    let total = members as u64 * messages;
    let delivered = Arc::new(AtomicU64::new(0));
    let per_thread = sockets.len().div_ceil(threads);
    let mut readers = Vec::new();
    while !sockets.is_empty() {
        let mine: Vec<Member> = sockets.drain(..per_thread.min(sockets.len())).collect();
        let delivered = delivered.clone();
        readers.push(std::thread::spawn(move || {
            read_loop(mine, &delivered, total)
        }));
    }

    let mut sender = Client::connect(addr, &boss).expect("sender");
    let mut sent_at = vec![Instant::now(); messages as usize + 1];
    let mut sent_latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let started = Instant::now();
    let (mut sent, mut answered) = (0u64, 0u64);
    while answered < messages {
        if sent < messages && sent - answered < window {
            sent += 1;
            sent_at[sent as usize] = Instant::now();
            sender
                .send(&Outgoing::to_group("big", &payload).id(sent).flags(0))
                .expect("send");
            continue;
        }
        match sender.recv().expect("recv") {
            Event::Status(s) if s.seq.is_none() => {
                assert_eq!(s.status, StatusCode::SENT);
                answered += 1;
                let took = sent_at[s.id as usize].elapsed().as_micros() as u64;
                sent_latency.saturating_record(took.max(1));
            }
            _ => {}
        }
    }
    let accepted = started.elapsed();
    for r in readers {
        r.join().expect("reader");
    }
    let elapsed = started.elapsed();
    println!(
        "members={members} messages={messages} payload={}B window={window}",
        payload.len()
    );
    println!(
        "accepted: {:.0} group sends/s ({messages} in {accepted:.2?}); deliveries: {:.0}/s ({total} in {elapsed:.2?})",
        messages as f64 / accepted.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "SENT latency µs: p50={} p90={} p99={} max={}",
        sent_latency.value_at_quantile(0.5),
        sent_latency.value_at_quantile(0.9),
        sent_latency.value_at_quantile(0.99),
        sent_latency.max()
    );
    server.shutdown().expect("clean shutdown");
}

/// Reads every socket until `total` deliveries were seen by all readers,
/// ACKing what each read pass brought.
fn read_loop(mut sockets: Vec<Member>, delivered: &AtomicU64, total: u64) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut ack = Vec::new();
    let mut seqs = Vec::new();
    while delivered.load(Ordering::Relaxed) < total {
        let mut idle = true;
        for m in &mut sockets {
            loop {
                match m.stream.read(&mut chunk) {
                    Ok(0) => panic!("server closed a member connection"),
                    Ok(n) => m.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => panic!("read: {e}"),
                }
            }
            let mut pos = 0;
            seqs.clear();
            while let Ok(len) = wire::check(&m.buf[pos..], u32::MAX) {
                let body = &m.buf[pos + HEADER_LEN..pos + len];
                if let Ok(Frame::Msg(msg)) = wire::decode(Kind(m.buf[pos]), body) {
                    seqs.push(msg.seq.unwrap_or(0));
                }
                pos += len;
            }
            m.buf.drain(..pos);
            if seqs.is_empty() {
                continue;
            }
            idle = false;
            delivered.fetch_add(seqs.len() as u64, Ordering::Relaxed);
            ack.clear();
            wire::encode(
                &Frame::Ack(wire::Ack {
                    seqs: wire::Seqs::List(&seqs),
                }),
                &mut ack,
            )
            .expect("encode");
            let mut off = 0;
            while off < ack.len() {
                match m.stream.write(&ack[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50))
                    }
                    Err(e) => panic!("write: {e}"),
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
