//! Routes of the HTTP API (see docs/http-api.md).

use serde::{Deserialize, Serialize};
use tiny_http::Method;

use super::{Reply, Req};
use crate::core::{Core, Phase, UserError};

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
