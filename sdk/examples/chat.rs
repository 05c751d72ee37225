//! A terminal chat on the SDK: one conversation, a local history that
//! survives restarts, offline sending, receipts and attachments.
//!
//! ```sh
//! cargo run --release -p tern-sdk --example chat -- \
//!     --token "$ALICE" --db alice.db --peer bob \
//!     [--addr 127.0.0.1:7700] [--http http://127.0.0.1:7780] [--group]
//! ```
//!
//! Type a line to send it. Commands: `/file PATH [caption]` sends a file,
//! `/get` downloads the last attachment received, `/history` shows the last
//! 20 messages, `/quit` leaves. Incoming messages are marked read as they
//! are shown.

use std::io::BufRead;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_sdk::{Config, Direction, Draft, Event, Message, Page, Peer, Status, Tern};

fn usage() -> ! {
    eprintln!(
        "usage: chat --token TOKEN --db FILE --peer NAME [--group] \
         [--addr HOST:PORT] [--http URL]"
    );
    std::process::exit(2)
}

fn line(m: &Message) -> String {
    let who = match m.direction {
        Direction::Outgoing => "me".to_owned(),
        Direction::Incoming => m.sender.clone().unwrap_or_default(),
    };
    let body = match m.attachment() {
        Some(a) => format!(
            "[file {} ({} bytes){}]",
            a.name,
            a.size,
            a.caption.map(|c| format!(": {c}")).unwrap_or_default()
        ),
        None if m.status == Status::Uploading => "[uploading a file]".to_owned(),
        None => m.text().unwrap_or("<binary>").to_owned(),
    };
    let mark = match (m.direction, m.status) {
        (Direction::Incoming, _) => "",
        (_, Status::Uploading | Status::Outbox) => " ·",
        (_, Status::Sent) => " ✓",
        (_, Status::Delivered) => " ✓✓",
        (_, Status::Read) => " ✓✓ read",
        _ => " ✗",
    };
    format!("{who}: {body}{mark}")
}

fn main() -> Result<(), tern_sdk::Error> {
    let mut args = std::env::args().skip(1);
    let (mut token, mut db, mut peer, mut group) = (None, None, None, false);
    let (mut addr, mut http) = ("127.0.0.1:7700".to_owned(), None);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--token" => token = Some(value()),
            "--db" => db = Some(value()),
            "--peer" => peer = Some(value()),
            "--addr" => addr = value(),
            "--http" => http = Some(value()),
            "--group" => group = true,
            _ => usage(),
        }
    }
    let (Some(token), Some(db), Some(peer)) = (token, db, peer) else {
        usage()
    };
    let peer = if group {
        Peer::group(peer)
    } else {
        Peer::user(peer)
    };
    let mut config = Config::new(addr, token, db);
    if let Some(h) = http {
        config = config.http(h);
    }
    let (tern, events) = Tern::open(config)?;

    let mut history = tern.store().messages(&peer, Page::latest(20))?;
    history.reverse();
    for m in &history {
        println!("{}", line(m));
    }
    tern.mark_read(&peer)?;

    let quit = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !quit.load(Ordering::Relaxed) {
                if let Some(event) = events.recv_timeout(Duration::from_millis(200)) {
                    show(&tern, &peer, event);
                }
            }
        });
        let result = prompt(&tern, &peer);
        quit.store(true, Ordering::Relaxed);
        result
    })?;
    tern.shutdown();
    Ok(())
}

/// Prints what an event says about the conversation with `peer`.
fn show(tern: &Tern, peer: &Peer, event: Event) {
    match event {
        Event::Received(m) if m.peer == *peer => {
            println!("{}", line(&m));
            let _ = tern.mark_read(peer);
        }
        Event::Received(m) => println!("({} has news)", m.peer),
        Event::Status { lid, member, .. } => {
            if let Ok(Some(m)) = tern.store().message(lid) {
                let who = member.map(|w| format!(" [{w}]")).unwrap_or_default();
                println!("  {}{who}", line(&m));
            }
        }
        Event::Connection(state) => println!("  -- {state:?}"),
        Event::Lagged => println!("  -- (events dropped; /history to re-read)"),
        _ => {}
    }
}

/// Reads commands and lines from stdin until EOF or `/quit`.
fn prompt(tern: &Tern, peer: &Peer) -> Result<(), tern_sdk::Error> {
    for input in std::io::stdin().lock().lines() {
        let Ok(input) = input else { break };
        let input = input.trim();
        if input == "/quit" {
            break;
        } else if input == "/history" {
            let mut page = tern.store().messages(peer, Page::latest(20))?;
            page.reverse();
            for m in &page {
                println!("{}", line(m));
            }
        } else if input == "/get" {
            let all = tern.store().all_messages(peer)?;
            match all
                .iter()
                .rev()
                .find(|m| m.direction == Direction::Incoming && m.attachment().is_some())
            {
                Some(m) => match tern.download(m) {
                    Ok(path) => println!("  saved {}", path.display()),
                    Err(e) => println!("  download failed: {e}"),
                },
                None => println!("  no attachment received"),
            }
        } else if let Some(rest) = input.strip_prefix("/file ") {
            let (path, caption) = match rest.split_once(' ') {
                Some((p, c)) => (p, Some(c)),
                None => (rest, None),
            };
            match tern.send_file(peer.clone(), Path::new(path), caption) {
                Ok(m) => println!("{}", line(&m)),
                Err(e) => println!("  {e}"),
            }
        } else if !input.is_empty() {
            match tern.send(Draft::text(peer.clone(), input)) {
                Ok(m) => println!("{}", line(&m)),
                Err(e) => println!("  {e}"),
            }
        }
    }
    Ok(())
}
