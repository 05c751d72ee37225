//! The web chat in a real browser: headless Chromium (Debian's `chromium`,
//! which `.ci/run` installs), driven over the DevTools protocol with
//! tungstenite, against the real server. Two users in two windows exchange
//! messages both ways over the WebSocket transport; the sender's page shows
//! sent → delivered → read; a message queued while a user was offline
//! arrives when they log in. No browser is a failure, never a skip.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern::client::Outgoing;
use tern::wire::StatusCode;
use tungstenite::{Message, WebSocket};

use crate::util::TestServer;

/// Headless Chromium, killed when dropped.
struct Browser {
    child: Child,
    cdp: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page (a window of its own, so that it counts as visible).
struct Page {
    session: String,
}

impl Browser {
    /// Starts Chromium. On this two-core machine, with the whole suite
    /// running at once, a start has printed no DevTools address within
    /// 30 s: that start is killed and a second one, with a fresh profile,
    /// is made (what a user would do too).
    fn launch() -> Browser {
        for attempt in 1..=2 {
            match Browser::try_launch(Duration::from_secs(30)) {
                Some(browser) => return browser,
                None => eprintln!("chromium printed no DevTools address (start {attempt})"),
            }
        }
        panic!("chromium printed no DevTools address, twice");
    }

    fn try_launch(wait: Duration) -> Option<Browser> {
        let exe = std::env::var("TERN_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(&exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--remote-debugging-port=0",
                "--window-size=1000,700",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} ({e}): install Debian's chromium (.ci/run does)")
            });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let Ok(url) = rx.recv_timeout(wait) else {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        };
        let host = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let stream = TcpStream::connect(&host).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (cdp, _) = tungstenite::client(url.as_str(), stream).expect("DevTools WebSocket");
        Some(Browser {
            child,
            cdp,
            next_id: 1,
            _profile: profile,
        })
    }

    /// Sends a DevTools command (to a page's session, if given) and returns
    /// its result; events in between are skipped.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.cdp.send(Message::text(msg.to_string())).unwrap();
        loop {
            let Message::Text(text) = self.cdp.read().expect("DevTools read") else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    fn open(&mut self, url: &str) -> Page {
        let target = self.call(
            None,
            "Target.createTarget",
            json!({"url": url, "newWindow": true}),
        );
        let target_id = target["targetId"].as_str().unwrap().to_owned();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        let session = attached["sessionId"].as_str().unwrap().to_owned();
        self.call(Some(&session), "Page.enable", json!({}));
        self.call(Some(&session), "Runtime.enable", json!({}));
        Page { session }
    }

    /// Evaluates `js` in the page; returns its value.
    fn eval(&mut self, page: &Page, js: &str) -> Value {
        let r = self.call(
            Some(&page.session),
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{js}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `js` every 50 ms until it is true, or panics after `within`.
    fn wait(&mut self, page: &Page, js: &str, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        while self.eval(page, js) != json!(true) {
            if Instant::now() >= deadline {
                let state = self.eval(
                    page,
                    "document.body.dataset.state + ' / ' + (document.querySelector('#login-error')?.textContent ?? '') + ' / ' + (document.querySelector('#conn-state')?.textContent ?? '')",
                );
                panic!("timed out waiting for {what} (page: {state})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts `path` in the page's file input `selector` (as if picked), which
    /// fires its `change` event.
    fn pick_file(&mut self, page: &Page, selector: &str, path: &std::path::Path) {
        let doc = self.call(Some(&page.session), "DOM.getDocument", json!({}));
        let root = doc["root"]["nodeId"].clone();
        let node = self.call(
            Some(&page.session),
            "DOM.querySelector",
            json!({"nodeId": root, "selector": selector}),
        );
        self.call(
            Some(&page.session),
            "DOM.setFileInputFiles",
            json!({"files": [path.to_str().unwrap()], "nodeId": node["nodeId"]}),
        );
    }

    fn screenshot(&mut self, page: &Page) -> Vec<u8> {
        let shot = self.call(
            Some(&page.session),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        );
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}

/// JS: sets an input's value as a user would, and fires `input`.
fn fill(selector: &str, value: &str) -> String {
    format!(
        "(() => {{ const e = document.querySelector({sel}); e.value = {val}; \
         e.dispatchEvent(new Event('input', {{bubbles: true}})); e.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()",
        sel = json!(selector),
        val = json!(value)
    )
}

/// JS: submits a form the way its submit button would.
fn submit(selector: &str) -> String {
    format!(
        "(() => {{ document.querySelector({}).requestSubmit(); return true; }})()",
        json!(selector)
    )
}

/// Logs a page in and waits until it is online.
fn log_in(b: &mut Browser, page: &Page, token: &str) {
    // The module script has run: `initLogin` fills the WebSocket field in
    // the same task in which it installs the submit handler. (Submitting
    // before that would reload the page with the token in the URL.)
    b.wait(
        page,
        "!!document.querySelector('#login-ws') && document.querySelector('#login-ws').value !== ''",
        Duration::from_secs(20),
        "the login form, ready",
    );
    b.eval(page, &fill("#login-token", token));
    b.eval(page, &submit("#login-form"));
    b.wait(
        page,
        "document.body.dataset.state === 'online'",
        Duration::from_secs(20),
        "online",
    );
}

/// Opens (or starts) the 1:1 conversation with `peer`.
fn open_chat(b: &mut Browser, page: &Page, peer: &str) {
    b.eval(page, &fill("#new-chat-kind", "user"));
    b.eval(page, &fill("#new-chat-address", peer));
    b.eval(page, &submit("#new-chat-form"));
    b.wait(
        page,
        &format!("!!document.querySelector('[data-testid=conversation-item][data-conversation=\"u:{peer}\"]')"),
        Duration::from_secs(10),
        "the conversation",
    );
}

/// Types and sends `text` in the open conversation.
fn say(b: &mut Browser, page: &Page, text: &str) {
    b.eval(page, &fill("#message-input", text));
    b.eval(
        page,
        "(() => { document.querySelector('#send-button').click(); return true; })()",
    );
}

/// JS: the data-status of the outgoing bubble whose text is `text`.
fn status_of(text: &str) -> String {
    format!(
        "(() => {{ const m = [...document.querySelectorAll('[data-testid=message][data-direction=out]')]\
         .find(e => e.querySelector('[data-testid=message-text]')?.textContent === {t}); \
         return m ? m.dataset.status : null; }})()",
        t = json!(text)
    )
}

/// JS: whether an incoming bubble with `text` is shown.
fn shows_incoming(text: &str) -> String {
    format!(
        "[...document.querySelectorAll('[data-testid=message][data-direction=in] [data-testid=message-text]')]\
         .some(e => e.textContent === {})",
        json!(text)
    )
}

#[test]
fn two_users_chat_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    // Queued for bob while he is offline.
    let mut carol = server.connect(&server.user("carol"));
    let queued = Outgoing::to("bob", b"sent while you were away").id(1);
    assert_eq!(carol.send_wait(&queued).unwrap(), StatusCode::SENT);

    let url = format!("http://{}/app/?ws=ws://{}/v1/ws", server.http, server.addr);
    let mut b = Browser::launch();
    let alice = b.open(&url);
    let bob = b.open(&url);
    log_in(&mut b, &alice, &ta);
    log_in(&mut b, &bob, &tb);

    // Bob gets what was queued while he was offline.
    open_chat(&mut b, &bob, "carol");
    b.wait(
        &bob,
        &shows_incoming("sent while you were away"),
        Duration::from_secs(10),
        "the queued message",
    );

    // Alice → bob: sent, then delivered (bob's page got it), then read
    // (bob has the conversation open).
    open_chat(&mut b, &alice, "bob");
    say(&mut b, &alice, "hello bob");
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = b.eval(&alice, &status_of("hello bob"));
        if let Some(s) = s.as_str() {
            seen.insert(s.to_owned());
        }
        if s == json!("delivered") || s == json!("read") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery; statuses seen: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    open_chat(&mut b, &bob, "alice");
    b.wait(
        &bob,
        &shows_incoming("hello bob"),
        Duration::from_secs(10),
        "alice's message at bob",
    );
    b.wait(
        &alice,
        &format!("{} === 'read'", status_of("hello bob")),
        Duration::from_secs(20),
        "read",
    );

    // And back.
    say(&mut b, &bob, "hi alice");
    b.wait(
        &alice,
        &shows_incoming("hi alice"),
        Duration::from_secs(10),
        "bob's answer",
    );
    b.wait(
        &bob,
        &format!("{} === 'read'", status_of("hi alice")),
        Duration::from_secs(20),
        "bob's read",
    );

    // A file: alice attaches it, bob's page shows it and downloads it
    // byte for byte (its sha256, computed by the page).
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = dir.path().join("notes.bin");
    std::fs::write(&file, &bytes).unwrap();
    b.pick_file(&alice, "#file-input", &file);
    let link = "[...document.querySelectorAll('[data-testid=message][data-direction=in] [data-testid=attachment-link]')].pop()";
    b.wait(
        &bob,
        &format!("!!{link}"),
        Duration::from_secs(20),
        "the attachment at bob",
    );
    let digest = b.eval(
        &bob,
        &format!(
            "(async () => {{ const r = await fetch({link}.href); const buf = await r.arrayBuffer(); \
             const d = await crypto.subtle.digest('SHA-256', buf); \
             return [...new Uint8Array(d)].map(x => x.toString(16).padStart(2, '0')).join(''); }})()"
        ),
    );
    use sha2::Digest;
    let want = hex::encode(sha2::Sha256::digest(&bytes));
    assert_eq!(digest, json!(want), "the downloaded file");

    let png = b.screenshot(&alice);
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let out = std::env::var_os("TERN_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("web-chat.png"));
    std::fs::write(&out, png).unwrap();
}

/// A kill -9 of the server while the page is sending: every message the
/// page showed as sent (or further) reaches the recipient exactly once, and
/// the page reconnects by itself when the server is back (through a proxy:
/// the restarted server listens on a new port).
#[test]
fn the_page_survives_a_server_kill_and_loses_nothing_it_showed_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let proxy = crate::proxy::Proxy::start(server.addr);
    let url = format!("http://{}/app/?ws=ws://{}/v1/ws", server.http, proxy.addr);
    let mut b = Browser::launch();
    let alice = b.open(&url);
    log_in(&mut b, &alice, &ta);
    open_chat(&mut b, &alice, "bob");
    // 60 messages, one every 20 ms, from the page itself.
    b.eval(
        &alice,
        "(() => { let i = 0; const t = setInterval(() => { \
           const input = document.querySelector('#message-input'); input.value = 'm' + (i++); \
           input.dispatchEvent(new Event('input', {bubbles: true})); \
           document.querySelector('#send-button').click(); if (i === 60) clearInterval(t); }, 20); return true; })()",
    );
    let shown_sent = "[...document.querySelectorAll('[data-testid=message][data-direction=out]')]\
        .filter(e => ['sent', 'delivered', 'read'].includes(e.dataset.status))\
        .map(e => e.querySelector('[data-testid=message-text]').textContent)";
    b.wait(
        &alice,
        &format!("{shown_sent}.length >= 10"),
        Duration::from_secs(20),
        "10 sent",
    );
    server.sigkill();
    let at_kill: Vec<String> = serde_json::from_value(b.eval(&alice, shown_sent)).unwrap();
    assert!(at_kill.len() >= 10);
    // Down for a moment: the page goes offline and keeps what is unanswered.
    b.wait(
        &alice,
        "document.body.dataset.state !== 'online'",
        Duration::from_secs(20),
        "offline",
    );
    server.restart();
    proxy.set_target(server.addr);
    b.wait(
        &alice,
        "document.body.dataset.state === 'online'",
        Duration::from_secs(30),
        "online again",
    );
    b.wait(
        &alice,
        &format!("{shown_sent}.length === 60"),
        Duration::from_secs(30),
        "all 60 sent",
    );
    let mut bob = server.connect(&tb);
    let mut got = std::collections::HashSet::new();
    while got.len() < 60 {
        let m = crate::util::msg(crate::util::next(&mut bob, 20));
        let text = String::from_utf8(m.payload).unwrap();
        assert!(got.insert(text.clone()), "{text} delivered twice");
        bob.ack(&[m.seq]).unwrap();
    }
    for text in &at_kill {
        assert!(
            got.contains(text),
            "{text} showed sent before the kill but never arrived"
        );
    }
    crate::util::barrier(&mut server.connect(&ta), &mut bob);
}
