//! Load generator: sender/receiver pairs over real sockets against a tern
//! server started in this process (a temporary data directory on 127.0.0.1),
//! or an external one (`--addr`, `--http`, `--admin`).
//!
//! ```text
//! cargo run --release --example loadgen -- --pairs 4 --messages 200000 --payload 100
//! cargo run --release --example loadgen -- --expiry 0          # real-time messages
//! ```
//!
//! Each sender pipelines up to `--window` SENDs (optionally paced at `--rate`
//! messages/s) and counts SENT answers, resending under the same ID what was
//! answered OVERLOADED; each receiver ACKs in batches. Reported: accepted messages/s (SENT, i.e. fsync'd
//! for EXPIRY > 0), delivered messages/s, and end-to-end latency from send to
//! receipt (hdrhistogram, µs).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tern::client::{Client, Event, Outgoing};
use tern::wire::StatusCode;

struct Args {
    pairs: usize,
    messages: u64,
    payload: usize,
    window: u64,
    expiry: u32,
    /// Messages per second per sender; 0 = as fast as the window allows.
    rate: u64,
    /// Speak TLS (in-process server only): a CA and certificate made with rcgen.
    tls: bool,
    external: Option<(SocketAddr, SocketAddr, String)>,
}

fn parse_args() -> Args {
    let mut a = Args {
        pairs: 4,
        messages: 200_000,
        payload: 100,
        window: 2_000,
        expiry: 3_600,
        rate: 0,
        external: None,
        tls: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (mut addr, mut http, mut admin) = (None, None, None);
    let mut i = 0;
    while i + 1 < argv.len() {
        let v = &argv[i + 1];
        match argv[i].as_str() {
            "--pairs" => a.pairs = v.parse().expect("--pairs"),
            "--messages" => a.messages = v.parse().expect("--messages"),
            "--payload" => a.payload = v.parse().expect("--payload"),
            "--window" => a.window = v.parse().expect("--window"),
            "--expiry" => a.expiry = v.parse().expect("--expiry"),
            "--rate" => a.rate = v.parse().expect("--rate"),
            "--tls" => a.tls = v == "1" || v == "true",
            "--addr" => addr = Some(v.parse().expect("--addr")),
            "--http" => http = Some(v.parse().expect("--http")),
            "--admin" => admin = Some(v.clone()),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    if let (Some(addr), Some(http), Some(admin)) = (addr, http, admin) {
        a.external = Some((addr, http, admin));
    }
    a
}

/// A CA and a certificate for localhost under `dir`: (cert, key, ca) paths.
fn make_certs(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    tern::tls::Pki::generate("loadgen CA", &["localhost".into()])
        .expect("certificate")
        .write(dir)
        .expect("write");
    (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    )
}

fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// An HTTP client for the server's HTTP listener and `path`'s URL there
/// (over HTTPS with `tls`, the certificate's name resolved to `http`).
fn http_client(
    http: SocketAddr,
    tls: Option<&tern::client::Tls>,
    path: &str,
) -> (ureq::Agent, String) {
    match tls {
        None => (
            ureq::AgentBuilder::new().build(),
            format!("http://{http}{path}"),
        ),
        Some(tls) => (
            tern::cli::https_agent(tls.config.clone(), "localhost", http),
            format!("https://localhost:{}{path}", http.port()),
        ),
    }
}

/// Creates a user through the admin API; returns its token.
fn create_user(
    http: SocketAddr,
    tls: Option<&tern::client::Tls>,
    admin: &str,
    address: &str,
) -> String {
    let (agent, url) = http_client(http, tls, "/v1/users");
    let v: serde_json::Value = agent
        .post(&url)
        .set("Authorization", &format!("Bearer {admin}"))
        .send_json(serde_json::json!({ "address": address }))
        .expect("create a user")
        .into_json()
        .expect("json");
    v["token"].as_str().expect("token").to_owned()
}

fn main() {
    let args = parse_args();
    let mut tls = None;
    let _dir;
    let _server;
    let (addr, http, admin) = match args.external.clone() {
        Some(e) => e,
        None => {
            _dir = tempfile::tempdir().expect("tempdir");
            let (tls_cert, tls_key) = match args.tls {
                true => {
                    let (cert, key, ca) = make_certs(_dir.path());
                    tls = Some(tern::client::Tls {
                        config: tern::client::tls_config(&ca).expect("ca"),
                        server_name: "localhost".try_into().expect("name"),
                    });
                    (Some(cert), Some(key))
                }
                false => (None, None),
            };
            let config = tern::config::Config {
                data_dir: _dir.path().to_path_buf(),
                listen: "127.0.0.1:0".parse().expect("addr"),
                http_listen: "127.0.0.1:0".parse().expect("addr"),
                admin_token: Some("loadgen".into()),
                tls_cert,
                tls_key,
                ..Default::default()
            };
            let server = tern::server::Server::start(config).expect("server");
            let e = (server.listen, server.http_listen, "loadgen".to_owned());
            _server = server;
            e
        }
    };
    let per_pair = args.messages / args.pairs as u64;
    let total = per_pair * args.pairs as u64;
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let delivered = Arc::new(AtomicU64::new(0));
    let tokens: Vec<(String, String)> = (0..args.pairs)
        .map(|i| {
            (
                create_user(http, tls.as_ref(), &admin, &format!("s{i}")),
                create_user(http, tls.as_ref(), &admin, &format!("r{i}")),
            )
        })
        .collect();
    let started = Instant::now();
    let mut threads = Vec::new();
    let accepted_at = Arc::new(Mutex::new(Duration::ZERO));
    let overloaded = Arc::new(AtomicU64::new(0));
    for (i, (st, rt)) in tokens.into_iter().enumerate() {
        let (latency, delivered) = (latency.clone(), delivered.clone());
        let options = tern::client::Options {
            tls: tls.clone(),
            ..Default::default()
        };
        let mut receiver = Client::connect_with(addr, &rt, options.clone()).expect("receiver");
        threads.push(std::thread::spawn(move || {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut acks = Vec::with_capacity(512);
            let mut got = 0;
            while got < per_pair {
                match receiver.recv_timeout(Duration::from_millis(20)) {
                    Ok(Some(Event::Msg(m))) => {
                        let sent = m
                            .payload
                            .get(..8)
                            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
                            .unwrap_or(0);
                        local.saturating_record(micros().saturating_sub(sent).max(1));
                        acks.push(m.seq);
                        got += 1;
                        if acks.len() >= 256 {
                            receiver.ack(&acks).expect("ack");
                            acks.clear();
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        receiver.ack(&acks).expect("ack");
                        acks.clear();
                    }
                    Err(e) => panic!("receiver: {e}"),
                }
            }
            receiver.ack(&acks).expect("ack");
            delivered.fetch_add(got, Ordering::Relaxed);
            latency.lock().expect("lock").add(&local).expect("add");
        }));
        let (payload_len, window, expiry, rate) =
            (args.payload.max(8), args.window, args.expiry, args.rate);
        let accepted_at = accepted_at.clone();
        let overloaded = overloaded.clone();
        let mut sender = Client::connect_with(addr, &st, options).expect("sender");
        threads.push(std::thread::spawn(move || {
            let mut payload = vec![0u8; payload_len];
            let (mut sent, mut answered) = (0u64, 0u64);
            let mut retry: Vec<u64> = Vec::new();
            let to = format!("r{i}");
            let begun = Instant::now();
            let burst = if rate == 0 {
                100
            } else {
                (rate / 100).clamp(1, 100)
            };
            while answered < per_pair {
                let outstanding = sent - answered;
                let paced =
                    rate == 0 || sent * 1_000_000 <= rate * begun.elapsed().as_micros() as u64;
                if (sent < per_pair || !retry.is_empty()) && outstanding + burst <= window && paced
                {
                    let ids: Vec<u64> = if retry.is_empty() {
                        (sent..per_pair.min(sent + burst)).map(|n| n + 1).collect()
                    } else {
                        std::thread::sleep(Duration::from_millis(1));
                        std::mem::take(&mut retry)
                    };
                    let batch: Vec<Outgoing> = ids
                        .iter()
                        .map(|&id| {
                            payload[..8].copy_from_slice(&micros().to_be_bytes());
                            Outgoing::to(&to, &payload).id(id).expiry(expiry).flags(0)
                        })
                        .collect();
                    sent += batch.len() as u64;
                    sender.send_many(&batch).expect("send");
                    continue;
                }
                let event = if rate == 0 || outstanding > 0 {
                    sender.recv().map(Some)
                } else {
                    sender.recv_timeout(Duration::from_micros(200))
                };
                match event {
                    Ok(Some(Event::Status(s))) if s.seq.is_none() => match s.status {
                        StatusCode::SENT => answered += 1,
                        StatusCode::OVERLOADED => {
                            overloaded.fetch_add(1, Ordering::Relaxed);
                            sent -= 1;
                            retry.push(s.id);
                        }
                        other => panic!("message {}: {other:?}", s.id),
                    },
                    Ok(_) => {}
                    Err(e) => panic!("sender: {e}"),
                }
            }
            let mut at = accepted_at.lock().expect("lock");
            *at = (*at).max(started.elapsed());
        }));
    }
    for t in threads {
        t.join().expect("thread");
    }
    let elapsed = started.elapsed();
    let accepted = *accepted_at.lock().expect("lock");
    let h = latency.lock().expect("lock");
    println!(
        "pairs={} messages={} payload={}B expiry={} window={} rate={}/s/pair overloaded_retries={}",
        args.pairs,
        total,
        args.payload,
        args.expiry,
        args.window,
        args.rate,
        overloaded.load(Ordering::Relaxed)
    );
    println!(
        "accepted: {:.0} msg/s ({} in {:.2?}); delivered: {:.0} msg/s ({} in {:.2?})",
        total as f64 / accepted.as_secs_f64(),
        total,
        accepted,
        delivered.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        delivered.load(Ordering::Relaxed),
        elapsed
    );
    println!(
        "end-to-end latency µs: p50={} p90={} p99={} p999={} max={}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    print_stages(http, tls.as_ref());
}

/// The server's per-stage latency of durable messages (`tern_stage_seconds`
/// in /metrics): where a message spent its time.
fn print_stages(http: SocketAddr, tls: Option<&tern::client::Tls>) {
    let (agent, url) = http_client(http, tls, "/metrics");
    let Some(text) = agent
        .get(&url)
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
    else {
        println!("server stages: /metrics unreachable");
        return;
    };
    let quantile = |stage: &str, q: &str| -> String {
        let prefix = format!("tern_stage_seconds{{stage=\"{stage}\",quantile=\"{q}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or("-".into(), |secs| format!("{:.0}", secs * 1e6))
    };
    let row: Vec<String> = tern::metrics::Stage::ALL
        .iter()
        .map(|s| s.name())
        .map(|s| format!("{s}={}/{}", quantile(s, "0.5"), quantile(s, "0.99")))
        .collect();
    println!("server stages µs (p50/p99): {}", row.join(" "));
}
