//! Routes of the HTTP API (see docs/http-api.md).

use serde::{Deserialize, Serialize};
use tiny_http::Method;

use super::{Reply, Req};
use crate::core::{Core, Group, GroupError, MemberSpec, Phase, UserError};

/// Dispatches a request to its handler.
pub fn route(core: &Core, req: &Req<'_>) -> Reply {
    match (req.method, req.path.as_slice()) {
        (Method::Get, ["healthz"]) => Reply::text(200, "ok"),
        (_, ["healthz"]) => not_allowed(),
        (Method::Get, ["readyz"]) => match core.phase() {
            Phase::Ready => Reply::text(200, "ready"),
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
            Method::Delete => match core.delete_user(address) {
                Ok(true) => Reply::empty(204),
                Ok(false) => no_user(),
                Err(e) => internal(&e),
            },
            _ => not_allowed(),
        }),
        (method, ["v1", "users", address, "tokens"]) => {
            admin(req).unwrap_or_else(|| match method {
                Method::Post => add_token(core, req, address),
                Method::Delete => match core.revoke_tokens(address) {
                    Ok(true) => Reply::empty(204),
                    Ok(false) => no_user(),
                    Err(e) => internal(&e),
                },
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

/// `Some(401)` unless the admin token was presented.
fn admin(req: &Req<'_>) -> Option<Reply> {
    (!req.admin).then(|| Reply::error(401, "unauthorized", "admin token required"))
}

fn parse<'a, T: Deserialize<'a>>(req: &'a Req<'_>) -> Result<T, Reply> {
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

fn create_user(core: &Core, req: &Req<'_>) -> Reply {
    let body: NewUser = match parse(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    match core.create_user(&body.address, body.name.as_deref(), body.token_ttl_secs) {
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

fn put_group(core: &Core, req: &Req<'_>, name: &str) -> Reply {
    let body: PutGroup = match parse(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let members = body.members.into_iter().map(MemberSpec::from).collect();
    match core.put_group(name, members) {
        Ok(created) => match core.group(name) {
            Some(g) => group_json(if created { 201 } else { 200 }, &g),
            None => Reply::error(404, "not_found", "group deleted meanwhile"),
        },
        Err(e) => group_error(e),
    }
}

fn get_group(core: &Core, name: &str) -> Reply {
    match core.group(name) {
        Some(g) => group_json(200, &g),
        None => group_error(GroupError::NotFound),
    }
}

fn delete_group(core: &Core, name: &str) -> Reply {
    match core.delete_group(name) {
        Ok(true) => Reply::empty(204),
        Ok(false) => group_error(GroupError::NotFound),
        Err(e) => group_error(e),
    }
}

fn change_members(core: &Core, req: &Req<'_>, name: &str) -> Reply {
    let body: ChangeMembers = match parse(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let add = body.add.into_iter().map(MemberSpec::from).collect();
    match core.change_members(name, add, &body.remove) {
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

fn get_user(core: &Core, address: &str) -> Reply {
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

fn add_token(core: &Core, req: &Req<'_>, address: &str) -> Reply {
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
    match core.add_token(address, body.token_ttl_secs) {
        Ok(Some(token)) => Reply::json(201, &TokenOut { token: &token }),
        Ok(None) => no_user(),
        Err(e) => internal(&e),
    }
}
