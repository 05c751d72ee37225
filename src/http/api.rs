//! Routes of the HTTP API (see docs/http-api.md).

use serde::{Deserialize, Serialize};
use tiny_http::Method;

use super::{Reply, Req};
use base64::Engine;

use super::{Backend, Phase};
use crate::admin::{GroupError, MemberSpec, UserError};
use crate::commit::{MessageFilter, ReplyTo, Request};
use crate::directory::{Group, User};
use crate::session::Outcome;
use crate::store::{ItemView, StoreError};
use crate::wire::StatusCode;

/// Every route the HTTP API serves, as (method, path pattern; `{..}` is one
/// path segment): the JSON routes of [`route`] and the `/v1/files` routes
/// that `http::handle` hands to the file server before it. Change it with
/// the `match` below; the test at the bottom of this file checks that each
/// one is served and every other method on these paths is 405, and
/// docs/openapi.yaml must document exactly these (tests/it/http_api.rs).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/users"),
    ("GET", "/v1/users/{address}"),
    ("DELETE", "/v1/users/{address}"),
    ("POST", "/v1/users/{address}/tokens"),
    ("DELETE", "/v1/users/{address}/tokens"),
    ("GET", "/v1/users/{address}/messages"),
    ("DELETE", "/v1/users/{address}/messages"),
    ("POST", "/v1/messages"),
    ("PUT", "/v1/groups/{name}"),
    ("GET", "/v1/groups/{name}"),
    ("DELETE", "/v1/groups/{name}"),
    ("POST", "/v1/groups/{name}/members"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/{id}"),
    ("HEAD", "/v1/files/{id}"),
    ("DELETE", "/v1/files/{id}"),
];

/// Dispatches a request to its handler (see [`ROUTES`]).
pub fn route(core: &Backend, req: &Req<'_>) -> Reply {
    match (req.method, req.path.as_slice()) {
        (Method::Get, ["healthz"]) => Reply::text(200, "ok"),
        (_, ["healthz"]) => not_allowed(),
        (Method::Get, ["readyz"]) => match core.phase() {
            Phase::Ready => match core.store().health() {
                Ok(()) => Reply::text(200, "ready"),
                Err(why) => Reply::text(503, why),
            },
            Phase::Starting => Reply::text(503, "starting"),
            Phase::ShuttingDown => Reply::text(503, "shutting down"),
        },
        (_, ["readyz"]) => not_allowed(),
        (method, ["v1", "users"]) => {
            if *method != Method::Post {
                return not_allowed();
            }
            admin(req).unwrap_or_else(|| create_user(core, req))
        }
        (method, ["v1", "users", address]) => admin(req).unwrap_or_else(|| match method {
            Method::Get => get_user(core, address),
            Method::Delete => match core.admin.delete_user(address) {
                Ok(true) => Reply::empty(204),
                Ok(false) => no_user(),
                Err(StoreError::Unavailable) => Reply::error(
                    503,
                    "unavailable",
                    "the store refused the purge (a write failed); the user stays: retry",
                ),
                Err(e) => internal(&e),
            },
            _ => not_allowed(),
        }),
        (method, ["v1", "users", address, "tokens"]) => {
            admin(req).unwrap_or_else(|| match method {
                Method::Post => add_token(core, req, address),
                Method::Delete => match core.admin.revoke_tokens(address) {
                    Ok(true) => Reply::empty(204),
                    Ok(false) => no_user(),
                    Err(e) => internal(&e),
                },
                _ => not_allowed(),
            })
        }
        (method, ["v1", "messages"]) => admin(req).unwrap_or_else(|| match method {
            Method::Post => post_message(core, req),
            _ => not_allowed(),
        }),
        (method, ["v1", "users", address, "messages"]) => {
            admin(req).unwrap_or_else(|| match method {
                Method::Get => list_messages(core, req, address),
                Method::Delete => delete_messages(core, req, address),
                _ => not_allowed(),
            })
        }
        (Method::Get, ["metrics"]) => super::metrics::render(core),
        (_, ["metrics"]) => not_allowed(),
        (method, ["v1", "groups", name]) => admin(req).unwrap_or_else(|| match method {
            Method::Put => put_group(core, req, name),
            Method::Get => get_group(core, name),
            Method::Delete => delete_group(core, name),
            _ => not_allowed(),
        }),
        (method, ["v1", "groups", name, "members"]) => admin(req).unwrap_or_else(|| match method {
            Method::Post => change_members(core, req, name),
            _ => not_allowed(),
        }),
        _ => Reply::error(404, "not_found", "no such endpoint"),
    }
}

fn not_allowed() -> Reply {
    Reply::error(405, "method_not_allowed", "method not allowed on this path")
}

/// `None` with the admin token; else 401, the same answer for no token, an
/// unknown one and a user token (so the answer does not tell valid tokens
/// apart).
fn admin(req: &Req<'_>) -> Option<Reply> {
    match req.admin {
        true => None,
        false => Some(Reply::error(401, "unauthorized", "admin token required")),
    }
}

fn parse<'a, T: Deserialize<'a>>(req: &'a Req<'_>) -> Result<T, Reply> {
    // serde would also map a JSON array onto a struct, field by field.
    if req.body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Reply::error(
            400,
            "bad_request",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Reply::error(400, "bad_request", format!("bad JSON: {e}")))
}

#[derive(Deserialize)]
struct NewUser {
    address: String,
    name: Option<String>,
    token_ttl_secs: Option<u64>,
}

#[derive(Serialize)]
struct Created<'a> {
    address: &'a str,
    token: &'a str,
}

fn create_user(core: &Backend, req: &Req<'_>) -> Reply {
    let body: NewUser = match parse(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    match core
        .admin
        .create_user(&body.address, body.name.as_deref(), body.token_ttl_secs)
    {
        Ok((created, token)) => Reply::json(
            if created { 201 } else { 200 },
            &Created {
                address: &body.address,
                token: &token,
            },
        ),
        Err(UserError::InvalidAddress) => Reply::error(
            400,
            "invalid_address",
            "an address is 1-255 bytes of ASCII letters, digits and ._@+-",
        ),
        Err(UserError::BeingDeleted) => Reply::error(
            409,
            "conflict",
            "an earlier DELETE of this user failed half-way: retry the DELETE first",
        ),
        Err(UserError::Store(e)) => {
            tracing::error!(error = %e, "creating a user failed");
            Reply::error(500, "internal", "storage error")
        }
    }
}

/// A member in a request: an address (send and receive) or an object.
#[derive(Deserialize)]
#[serde(untagged)]
enum MemberIn {
    Address(String),
    Object {
        address: String,
        #[serde(default = "yes")]
        send: bool,
        #[serde(default = "yes")]
        recv: bool,
    },
}

fn yes() -> bool {
    true
}

impl From<MemberIn> for MemberSpec {
    fn from(m: MemberIn) -> MemberSpec {
        match m {
            MemberIn::Address(address) => MemberSpec {
                address,
                send: true,
                recv: true,
            },
            MemberIn::Object {
                address,
                send,
                recv,
            } => MemberSpec {
                address,
                send,
                recv,
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutGroup {
    members: Vec<MemberIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeMembers {
    #[serde(default)]
    add: Vec<MemberIn>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Serialize)]
struct MemberOut<'a> {
    address: &'a str,
    send: bool,
    recv: bool,
}

#[derive(Serialize)]
struct GroupOut<'a> {
    name: &'a str,
    members: Vec<MemberOut<'a>>,
}

fn group_json(status: u16, group: &Group) -> Reply {
    Reply::json(
        status,
        &GroupOut {
            name: &group.name,
            members: group
                .members
                .iter()
                .map(|m| MemberOut {
                    address: &m.user.address,
                    send: m.send,
                    recv: m.recv,
                })
                .collect(),
        },
    )
}

fn group_error(e: GroupError) -> Reply {
    match e {
        GroupError::InvalidName => Reply::error(
            400,
            "invalid_name",
            "a group name is 1-255 bytes of ASCII letters, digits and ._@+-",
        ),
        GroupError::UnknownUser(a) => Reply::error(400, "unknown_user", format!("no user {a:?}")),
        GroupError::TooLarge(n) => Reply::error(
            400,
            "too_many_members",
            format!("a group has at most {n} members"),
        ),
        GroupError::NotFound => Reply::error(404, "not_found", "no such group"),
        GroupError::Store(e) => {
            tracing::error!(error = %e, "group change failed");
            Reply::error(500, "internal", "storage error")
        }
    }
}

fn put_group(core: &Backend, req: &Req<'_>, name: &str) -> Reply {
    let body: PutGroup = match parse(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let members = body.members.into_iter().map(MemberSpec::from).collect();
    match core.admin.put_group(name, members) {
        Ok(created) => match core.group(name) {
            Some(g) => group_json(if created { 201 } else { 200 }, &g),
            None => Reply::error(404, "not_found", "group deleted meanwhile"),
        },
        Err(e) => group_error(e),
    }
}

fn get_group(core: &Backend, name: &str) -> Reply {
    match core.group(name) {
        Some(g) => group_json(200, &g),
        None => group_error(GroupError::NotFound),
    }
}

fn delete_group(core: &Backend, name: &str) -> Reply {
    match core.admin.delete_group(name) {
        Ok(true) => Reply::empty(204),
        Ok(false) => group_error(GroupError::NotFound),
        Err(e) => group_error(e),
    }
}

fn change_members(core: &Backend, req: &Req<'_>, name: &str) -> Reply {
    let body: ChangeMembers = match parse(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let add = body.add.into_iter().map(MemberSpec::from).collect();
    match core.admin.change_members(name, add, &body.remove) {
        Ok(g) => group_json(200, &g),
        Err(e) => group_error(e),
    }
}

fn no_user() -> Reply {
    Reply::error(404, "not_found", "no such user")
}

fn internal(e: &dyn std::fmt::Display) -> Reply {
    tracing::error!(error = %e, "admin request failed");
    Reply::error(500, "internal", "storage error")
}

#[derive(Serialize)]
struct UserOut<'a> {
    address: &'a str,
    name: String,
    online: bool,
    pending: u64,
}

fn get_user(core: &Backend, address: &str) -> Reply {
    let Some(user) = core.user(address) else {
        return no_user();
    };
    let name = user.name.lock().map(|n| n.clone()).unwrap_or_default();
    Reply::json(
        200,
        &UserOut {
            address: &user.address,
            name,
            online: user.mailbox().is_some(),
            pending: user.queued.load(std::sync::atomic::Ordering::Relaxed),
        },
    )
}

#[derive(Deserialize, Default)]
struct NewToken {
    token_ttl_secs: Option<u64>,
}

fn add_token(core: &Backend, req: &Req<'_>, address: &str) -> Reply {
    let body: NewToken = if req.body.iter().all(u8::is_ascii_whitespace) {
        NewToken::default()
    } else {
        match parse(req) {
            Ok(b) => b,
            Err(reply) => return reply,
        }
    };
    #[derive(Serialize)]
    struct TokenOut<'a> {
        token: &'a str,
    }
    match core.admin.add_token(address, body.token_ttl_secs) {
        Ok(Some(token)) => Reply::json(201, &TokenOut { token: &token }),
        Ok(None) => no_user(),
        Err(e) => internal(&e),
    }
}

/// The body of `POST /v1/messages`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMessage {
    from: String,
    to: Option<String>,
    group: Option<String>,
    id: Option<u64>,
    payload: Option<String>,
    payload_b64: Option<String>,
    expiry: Option<u32>,
    #[serde(rename = "type")]
    msg_type: Option<u32>,
    priority: Option<u8>,
    flags: Option<u32>,
}

/// The lower-case name of a status, for JSON.
fn status_name(status: StatusCode) -> String {
    status.name().unwrap_or("unknown").to_ascii_lowercase()
}

fn post_message(core: &Backend, req: &Req<'_>) -> Reply {
    let body: NewMessage = match parse(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let payload = match (body.payload, body.payload_b64) {
        (Some(p), None) => p.into_bytes(),
        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b.as_bytes()) {
            Ok(p) => p,
            Err(e) => return Reply::error(400, "bad_request", format!("payload_b64: {e}")),
        },
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return Reply::error(400, "bad_request", "give payload or payload_b64, not both")
        }
    };
    for address in [Some(&body.from), body.to.as_ref(), body.group.as_ref()]
        .into_iter()
        .flatten()
    {
        if !crate::wire::is_valid_address(address) {
            return Reply::error(
                400,
                "invalid_address",
                format!("invalid address {address:?}"),
            );
        }
    }
    let Some(sender) = core.user(&body.from) else {
        return Reply::error(404, "not_found", format!("no user {:?}", body.from));
    };
    let send = crate::wire::Send {
        id: body.id.filter(|&i| i != 0),
        to: body.to.as_deref(),
        group: body.group.as_deref(),
        expiry: body.expiry,
        msg_type: body.msg_type,
        priority: body.priority,
        flags: body.flags,
        payload: Some(&payload),
    };
    let (tx, rx) = crossbeam::channel::bounded(1);
    let (_, outcome) = crate::session::accept::send(
        &*core.env,
        &sender,
        &send,
        crate::clock::now_ms(),
        crate::clock::mono_us(),
        ReplyTo::Channel(tx),
        false,
    );
    let status = match outcome {
        Outcome::Now(status) => status,
        Outcome::Queued => match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            // Fire-and-forget has no status: accepted.
            Ok(status) => status.unwrap_or(StatusCode::SENT),
            Err(_) => StatusCode::OVERLOADED,
        },
    };
    #[derive(Serialize)]
    struct Sent {
        status: String,
        id: u64,
    }
    let (code, error) = match status {
        StatusCode::SENT
        | StatusCode::DELIVERED
        | StatusCode::READ
        | StatusCode::EXPIRED
        | StatusCode::DELETED => {
            return Reply::json(
                202,
                &Sent {
                    status: status_name(status),
                    id: body.id.unwrap_or(0),
                },
            )
        }
        StatusCode::INVALID_DEST => (404, "invalid_dest"),
        StatusCode::NOT_MEMBER => (403, "not_member"),
        StatusCode::TOO_LARGE => (413, "too_large"),
        StatusCode::OFFLINE => (409, "offline"),
        StatusCode::OVERLOADED => (503, "overloaded"),
        _ => (400, "bad_request"),
    };
    Reply::error(
        code,
        error,
        format!("SEND refused: {}", status_name(status)),
    )
}

/// A query string's value for `key`.
fn query<'q>(req: &Req<'q>, key: &str) -> Option<&'q str> {
    req.query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn query_u64(req: &Req<'_>, key: &str) -> Result<Option<u64>, Reply> {
    match query(req, key) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| Reply::error(400, "bad_request", format!("{key}: not a number"))),
    }
}

#[derive(Serialize)]
struct MessageOut<'a> {
    seq: u64,
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    id: u64,
    time: u64,
    expire_at: u64,
    #[serde(rename = "type")]
    msg_type: u32,
    priority: u8,
    flags: u32,
    delivered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
}

/// Adds the user's group shares held in memory (queued, but with no REF
/// in the store: `directory::User::shares`) to `rows`, among the queued
/// ones in delivery order, and keeps the first `limit`.
fn with_held_shares(rows: &mut Vec<crate::store::Listed>, user: &User, since: u64, limit: usize) {
    let held = user.shares_after(&[0; crate::store::keys::PRIORITIES]);
    if held.is_empty() {
        return;
    }
    let queued = rows.iter().take_while(|r| !r.2).count();
    let retained = rows.split_off(queued);
    rows.extend(held.into_iter().filter_map(|item| match item.view() {
        Some(ItemView::Msg(m)) if m.time >= since => {
            Some((item.seq, item.priority, false, item.record.clone()))
        }
        _ => None,
    }));
    rows.sort_by_key(|r| (r.1, r.0));
    rows.dedup_by_key(|r| (r.1, r.0));
    rows.extend(retained);
    rows.truncate(limit);
}

fn list_messages(core: &Backend, req: &Req<'_>, address: &str) -> Reply {
    let Some(user) = core.user(address) else {
        return no_user();
    };
    let (since, limit) = match (query_u64(req, "since"), query_u64(req, "limit")) {
        (Ok(s), Ok(l)) => (s.unwrap_or(0), l.unwrap_or(100).clamp(1, 1000) as usize),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let retained = core.config.retain_delivered;
    let mut rows = match core.store().list_messages(address, since, limit, retained) {
        Ok(rows) => rows,
        Err(e) => return internal(&e),
    };
    with_held_shares(&mut rows, &user, since, limit);
    let messages: Vec<MessageOut<'_>> = rows
        .iter()
        .filter_map(|(seq, priority, delivered, record)| {
            let Some(ItemView::Msg(m)) = crate::store::record::decode_item(record) else {
                return None;
            };
            let text = std::str::from_utf8(m.payload).ok();
            Some(MessageOut {
                seq: *seq,
                from: m.from,
                group: m.group,
                id: m.id,
                time: m.time,
                expire_at: m.expire_at,
                msg_type: m.msg_type,
                priority: *priority,
                flags: m.flags,
                delivered: *delivered,
                payload: text,
                payload_b64: text
                    .is_none()
                    .then(|| base64::engine::general_purpose::STANDARD.encode(m.payload)),
            })
        })
        .collect();
    #[derive(Serialize)]
    struct List<'a> {
        messages: Vec<MessageOut<'a>>,
    }
    Reply::json(200, &List { messages })
}

fn delete_messages(core: &Backend, req: &Req<'_>, address: &str) -> Reply {
    let Some(user) = core.user(address) else {
        return no_user();
    };
    let filter = match (
        query(req, "from"),
        query_u64(req, "id"),
        query_u64(req, "before"),
    ) {
        (Some(from), Ok(Some(id)), Ok(None)) => MessageFilter::Id {
            from: from.to_owned(),
            id,
        },
        (None, Ok(None), Ok(Some(before))) => MessageFilter::Before(before),
        (_, Err(r), _) | (_, _, Err(r)) => return r,
        _ => {
            return Reply::error(
                400,
                "bad_request",
                "give ?id=<id>&from=<address>, or ?before=<ms>",
            )
        }
    };
    let (done, wait) = crossbeam::channel::bounded(1);
    if !core
        .commit
        .submit(Request::DeleteMessages { user, filter, done })
    {
        return Reply::error(503, "overloaded", "the store is not accepting work");
    }
    #[derive(Serialize)]
    struct Deleted {
        deleted: usize,
    }
    match wait.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Some(deleted)) => Reply::json(200, &Deleted { deleted }),
        Ok(None) => Reply::error(
            503,
            "unavailable",
            "the store refused the delete (a write failed); nothing was deleted: retry",
        ),
        Err(_) => Reply::error(503, "overloaded", "the delete did not finish in time"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};

    use super::ROUTES;
    use crate::config::Config;
    use crate::server::Server;

    const TOKEN: &str = "route-test-token";

    /// One admin request with a `{}` body over a real connection: status
    /// and body.
    fn call(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
        .expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{method} {path}: no status in {resp:?}"));
        (code, resp)
    }

    /// The table and what is served agree: each listed route reaches a
    /// handler (anything but 405 and the catch-all 404), and every other
    /// method on a listed path is 405.
    #[test]
    fn routes_are_exactly_the_ones_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            listen: ([127, 0, 0, 1], 0).into(),
            http_listen: ([127, 0, 0, 1], 0).into(),
            admin_token: Some(TOKEN.into()),
            workers: 1,
            ..Config::default()
        };
        let server = Server::start(config).expect("start");
        let addr = server.http_listen;
        let concrete = |pattern: &str| {
            pattern
                .replace("{address}", "nobody")
                .replace("{name}", "nogroup")
                .replace("{id}", "0123456789abcdef0123456789abcdef")
        };
        for (method, pattern) in ROUTES {
            let (code, resp) = call(addr, method, &concrete(pattern));
            assert!(
                (200..500).contains(&code) && code != 405 && !resp.contains("no such endpoint"),
                "{method} {pattern} is not served: {resp}"
            );
        }
        let patterns: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
        for pattern in patterns {
            for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"] {
                if !ROUTES.contains(&(method, pattern)) {
                    let (code, resp) = call(addr, method, &concrete(pattern));
                    assert_eq!(code, 405, "{method} {pattern} is served: {resp}");
                }
            }
        }
        server.shutdown().expect("clean shutdown");
    }
}
