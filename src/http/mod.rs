//! The only user of tiny_http: the admin/backend API and the operational
//! endpoints, on `http_listen`.
//!
//! One dispatcher thread takes requests from the tiny_http server and runs
//! each on a thread of its own, at most [`MAX_IN_FLIGHT`] at once (503
//! beyond): a slow upload or a client that never sends its body holds one
//! thread, not the API. Handlers reach the server through [`Backend`]: the
//! admin operations, the directory, the commit queue, and the session's own
//! SEND rules through the same [`Env`] port a connection uses.
//! Every error is JSON: `{"error": "<snake_case>", "message": "<text>"}`.

pub mod api;
mod assets;
pub mod files;
mod metrics;

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::admin::Admin;
use crate::admission::{Conns, Summary, Ticket};
use crate::clock::now_ms;
use crate::commit::Commit;
use crate::config::Config;
use crate::directory::{Group, User};
use crate::metrics::Metrics;
use crate::session::Env;
use crate::store::{Store, StoreError};

/// Where the server is in its life (`/readyz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Starting: not ready yet.
    Starting,
    /// Serving.
    Ready,
    /// Shutting down: not ready any more.
    ShuttingDown,
}

/// What the handlers reach: everything the HTTP API may ask of the server.
pub struct Backend {
    /// The validated configuration.
    pub config: Config,
    /// Users, tokens and groups.
    pub admin: Admin,
    /// The commit queue (message deletion).
    pub commit: Commit,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The port a session uses: a backend SEND goes through the very same
    /// rules as a SEND frame.
    pub env: Arc<dyn Env + Send + Sync>,
    /// Starting, ready, shutting down.
    phase: Mutex<Phase>,
}

impl Backend {
    /// The handlers' view of the server, starting.
    pub fn new(
        config: Config,
        admin: Admin,
        commit: Commit,
        metrics: Arc<Metrics>,
        env: Arc<dyn Env + Send + Sync>,
    ) -> Backend {
        Backend {
            config,
            admin,
            commit,
            metrics,
            env,
            phase: Mutex::new(Phase::Starting),
        }
    }

    /// The store (listing messages).
    pub fn store(&self) -> &Store {
        &self.admin.store
    }

    /// The user with this address, if it exists.
    pub fn user(&self, address: &str) -> Option<Arc<User>> {
        self.admin.dir.user(address)
    }

    /// The group with this name, if it exists.
    pub fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.admin.dir.group(name)
    }

    /// The user a token authenticates.
    pub fn authenticate(&self, token: &str) -> Result<Option<Arc<User>>, StoreError> {
        self.admin
            .dir
            .authenticate(&self.admin.store, token, now_ms())
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to a new phase.
    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }
}

/// Requests handled at once; more are answered 503 at once.
pub const MAX_IN_FLIGHT: usize = 512;
/// Largest JSON body accepted, bytes: room for a PUT of a 100,000-member
/// group. JSON bodies are read whole; at most [`MAX_JSON_IN_FLIGHT`] of them
/// at once, so they hold at most 128 MiB.
const MAX_JSON: usize = 8 << 20;
/// Threads answering 503 at once; beyond that the dispatcher answers itself.
const MAX_REFUSING: usize = 256;
/// JSON bodies read at once (more wait for a slot).
const MAX_JSON_IN_FLIGHT: usize = 16;

/// A running HTTP server.
pub struct Http {
    server: Arc<Server>,
    /// Set before the handlers are unblocked, so an `Err` from `recv` can be
    /// told apart from a transient accept error.
    stopping: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// Starts serving on `listener` with the given admin token.
pub fn start(
    core: Arc<Backend>,
    listener: std::net::TcpListener,
    admin_token: String,
    tls: Option<Arc<crate::tls::Certs>>,
) -> std::io::Result<Http> {
    let files = Arc::new(files::Files::open(
        &core.config,
        core.metrics.clone(),
        core.admin.store.clone(),
    )?);
    files::Files::start_sweep(&files, &core.config)?;
    let tls = tls.map(|certs| -> tiny_http::TlsSource { Arc::new(move || certs.current()) });
    let server = Server::from_listener_admitting(listener, tls, admission(&core.config))
        .map(Arc::new)
        .map_err(std::io::Error::other)?;
    let admin = Arc::new(Sha256::digest(admin_token.as_bytes()).to_vec());
    let stopping = Arc::new(AtomicBool::new(false));
    let dispatcher = {
        let (server, stopping) = (server.clone(), stopping.clone());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let refusing = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            core,
            files,
            admin,
            json_slots: Mutex::new(0),
            json_free: Condvar::new(),
        });
        thread::Builder::new()
            .name("tern-http".into())
            .spawn(move || loop {
                let request = match server.recv() {
                    Ok(r) => r,
                    Err(_) if stopping.load(Ordering::Acquire) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "http accept failed");
                        continue;
                    }
                };
                if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    // Answering may wait on the client (a write to a peer
                    // that does not read blocks up to the write timeout): not
                    // on this thread, which must keep taking requests.
                    let busy = Reply::error(503, "overloaded", "too many requests in progress");
                    if refusing.fetch_add(1, Ordering::AcqRel) < MAX_REFUSING {
                        let refusing = refusing.clone();
                        let spawned =
                            thread::Builder::new()
                                .name("tern-http-503".into())
                                .spawn(move || {
                                    respond(request, busy);
                                    refusing.fetch_sub(1, Ordering::AcqRel);
                                });
                        if spawned.is_err() {
                            tracing::warn!("cannot start an http refusal thread");
                        }
                    } else {
                        refusing.fetch_sub(1, Ordering::AcqRel);
                        respond(request, busy);
                    }
                    continue;
                }
                let (shared, in_flight) = (shared.clone(), in_flight.clone());
                let spawned =
                    thread::Builder::new()
                        .name("tern-http-req".into())
                        .spawn(move || {
                            handle(&shared, request);
                            in_flight.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start an http handler thread");
                }
            })?
    };
    Ok(Http {
        server,
        stopping,
        threads: vec![dispatcher],
    })
}

/// What every handler thread shares.
struct Shared {
    core: Arc<Backend>,
    files: Arc<files::Files>,
    /// SHA-256 of the admin token.
    admin: Arc<Vec<u8>>,
    /// JSON bodies being read, bounded by [`MAX_JSON_IN_FLIGHT`].
    json_slots: Mutex<usize>,
    json_free: Condvar,
}

impl Shared {
    /// Reads a JSON body (at most `MAX_JSON + 1` bytes) under a slot.
    fn read_body(&self, request: &mut Request) -> Result<Vec<u8>, ()> {
        {
            let mut n = self.json_slots.lock().unwrap_or_else(|e| e.into_inner());
            while *n >= MAX_JSON_IN_FLIGHT {
                n = self.json_free.wait(n).unwrap_or_else(|e| e.into_inner());
            }
            *n += 1;
        }
        let mut body = Vec::new();
        let result = MinRate::new(request.as_reader())
            .take(MAX_JSON as u64 + 1)
            .read_to_end(&mut body)
            .map(|_| body)
            .map_err(|_| ());
        *self.json_slots.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.json_free.notify_one();
        result
    }
}

impl Http {
    /// Stops taking requests and waits for the dispatcher (requests in
    /// progress finish on their own threads).
    pub fn shutdown(self) {
        self.stopping.store(true, Ordering::Release);
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// An HTTP answer: status and JSON (or plain) body.
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
    /// Its Content-Type.
    pub content_type: &'static str,
    /// Further headers.
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        Reply {
            status,
            body: serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            body: body.into(),
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
        }
    }

    /// An answer with no body.
    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            body: Vec::new(),
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
        }
    }

    /// The spec's error shape.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Reply {
        #[derive(Serialize)]
        struct E<'a> {
            error: &'a str,
            message: String,
        }
        Reply::json(
            status,
            &E {
                error: code,
                message: message.into(),
            },
        )
    }
}

/// What a handler sees of a request.
pub struct Req<'r> {
    pub method: &'r Method,
    /// Path segments after the leading `/`, query removed.
    pub path: Vec<&'r str>,
    /// The raw query string.
    pub query: &'r str,
    /// Whether the admin bearer token was presented.
    pub admin: bool,
    /// The body, for methods that carry one (bounded by [`MAX_JSON`]).
    pub body: Vec<u8>,
}

fn handle(shared: &Shared, mut request: Request) {
    let (core, files, admin_hash) = (&*shared.core, &*shared.files, &shared.admin[..]);
    let url = request.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    if let Some(reply) = assets::serve(*request.method() == Method::Get, path) {
        return respond(request, reply);
    }
    let token = bearer(&request);
    let peer = request.remote_addr().map(|a| a.ip());
    let logins = core.env.logins();
    if let (Some(_), Some(ip)) = (&token, peer) {
        if let Err(wait) = logins.check(ip, now_ms()) {
            // Refused unchecked, whatever the token: a guess made now tells nothing.
            let mut reply = Reply::error(
                429,
                "too_many_requests",
                "too many failed logins from this address: retry later",
            );
            reply
                .headers
                .push(("Retry-After", wait.div_ceil(1000).to_string()));
            return respond(request, reply);
        }
    }
    let admin = token
        .as_ref()
        .map(|t| Sha256::digest(t.as_bytes()).ct_eq(admin_hash).into())
        .unwrap_or(false);
    // A token that is neither the admin's nor a user's is a failed login
    // (a user token is not: it is answered 401 on admin routes, like none).
    if let (false, Some(t), Some(ip)) = (admin, &token, peer) {
        if matches!(core.authenticate(t), Ok(None)) {
            logins.failed(ip, now_ms());
        }
    }
    if path == "/v1/files" || path.starts_with("/v1/files/") {
        // Files stream their bodies: they never go through the JSON reader.
        files.handle(core, admin, request);
        return;
    }
    let mut body = Vec::new();
    // Every JSON route needs the admin token: without it the body is not
    // read at all (the route answers 401/403), so unauthenticated clients
    // cannot hold the JSON body slots.
    let too_large = admin && matches!(request.method(), Method::Post | Method::Put) && {
        match shared.read_body(&mut request) {
            Ok(b) => {
                body = b;
                body.len() > MAX_JSON
            }
            Err(()) => true,
        }
    };
    let method = request.method().clone();
    let reply = if too_large {
        Reply::error(413, "payload_too_large", "request body too large")
    } else {
        let req = Req {
            method: &method,
            path: path.trim_start_matches('/').split('/').collect(),
            query,
            admin,
            body,
        };
        api::route(core, &req)
    };
    respond(request, reply);
}

/// Sends a [`Reply`].
pub fn respond(request: Request, reply: Reply) {
    let mut response = Response::from_data(reply.body).with_status_code(reply.status);
    if let Ok(h) = Header::from_bytes("Content-Type", reply.content_type) {
        response.add_header(h);
    }
    for (name, value) in &reply.headers {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "http response failed");
    }
}

/// Connections the HTTP listener takes at most, in all and per address,
/// checked on its accept thread (each open connection holds a thread).
fn admission(config: &Config) -> tiny_http::Admit {
    /// Refusals at `http_max_connections`, logged once per interval.
    static AT_CAPACITY: Summary =
        Summary::new("HTTP connections refused: http_max_connections reached");
    let per_address = Conns::new(
        config.http_max_connections_per_ip,
        0,
        "HTTP connections refused: over http_max_connections_per_ip",
    );
    let open = Arc::new(AtomicUsize::new(0));
    let max = config.http_max_connections;
    Box::new(move |peer| {
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            AT_CAPACITY.note(now_ms());
            return None;
        }
        let mut slot = HttpSlot {
            open: open.clone(),
            _ticket: None,
        };
        match peer.map(|p| per_address.admit(p.ip())) {
            Some(Err(_)) => {
                per_address.refused.note(now_ms());
                return None; // `slot` gives its place back
            }
            Some(Ok(ticket)) => slot._ticket = Some(ticket),
            None => {}
        }
        Some(Box::new(slot))
    })
}

/// One admitted HTTP connection.
struct HttpSlot {
    open: Arc<AtomicUsize>,
    _ticket: Option<Ticket>,
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The slowest a request body may arrive, on average, after [`BODY_GRACE`]:
/// a client that sends slower is cut off, so it cannot hold a handler
/// thread for long (a 100 MiB upload at this rate takes under four hours;
/// at 1 Mbit/s, 14 minutes).
pub const MIN_BODY_RATE: u64 = 8 * 1024;
/// Time a body may take before [`MIN_BODY_RATE`] applies.
pub const BODY_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A body reader that fails with `TimedOut` once the body falls behind
/// [`MIN_BODY_RATE`] (after [`BODY_GRACE`]). Each read can still wait one
/// socket read timeout (10 s), so the bound is the rate plus 10 s.
///
/// A response body is wrapped the same way ([`MinRate::response`]): its
/// reads come as the client takes what was written, so a client that
/// takes it slower than the rate is cut off, and cannot hold a handler
/// thread for long by reading a large file a trickle at a time (each write
/// still waits at most the 30 s write timeout).
pub struct MinRate<R> {
    inner: R,
    started: std::time::Instant,
    read: u64,
    grace: std::time::Duration,
    rate: u64,
    what: &'static str,
}

impl<R> MinRate<R> {
    /// Starts the clock on a request body.
    pub fn new(inner: R) -> MinRate<R> {
        MinRate::with(
            inner,
            BODY_GRACE,
            MIN_BODY_RATE,
            "request body arrives too slowly",
        )
    }

    /// Starts the clock on a response body.
    pub fn response(inner: R) -> MinRate<R> {
        MinRate::with(
            inner,
            BODY_GRACE,
            MIN_BODY_RATE,
            "response taken too slowly",
        )
    }

    fn with(inner: R, grace: std::time::Duration, rate: u64, what: &'static str) -> MinRate<R> {
        MinRate {
            inner,
            started: std::time::Instant::now(),
            read: 0,
            grace,
            rate,
            what,
        }
    }
}

impl<R: Read> Read for MinRate<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let allowed = self.grace + std::time::Duration::from_secs(self.read / self.rate);
        if self.started.elapsed() > allowed {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, self.what));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// The bearer token of a request, if any.
pub fn bearer(request: &Request) -> Option<String> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| {
            h.value
                .as_str()
                .strip_prefix("Bearer ")
                .map(|t| t.trim().to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_body_behind_the_rate_is_cut_off_after_the_grace() {
        let data = [7u8; 64];
        let mut r = MinRate::with(&data[..], Duration::from_millis(50), 1, "slow");
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).unwrap(), 8);
        // 8 bytes at 1 byte/s buy 8 s: still in time after the grace.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.read(&mut buf).unwrap(), 8);
        let mut late = MinRate::with(&data[..], Duration::from_millis(50), 1 << 20, "slow");
        assert_eq!(late.read(&mut buf).unwrap(), 8);
        std::thread::sleep(Duration::from_millis(60));
        let e = late.read(&mut buf).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string()),
            (std::io::ErrorKind::TimedOut, "slow".into())
        );
    }
}
