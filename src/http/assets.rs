//! The browser client and the web chat, embedded in the binary and served
//! on the HTTP listener: `/client/` (`clients/js/`, the ES module a page
//! imports) and `/app/` (`web/app/`, the web chat). GET only, no token.

use super::Reply;

/// (path, Content-Type, body).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/client/tern.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../clients/js/tern.js"),
    ),
    (
        "/client/tern.d.ts",
        "application/typescript; charset=utf-8",
        include_bytes!("../../clients/js/tern.d.ts"),
    ),
    (
        "/client/README.md",
        "text/markdown; charset=utf-8",
        include_bytes!("../../clients/js/README.md"),
    ),
    (
        "/app/",
        "text/html; charset=utf-8",
        include_bytes!("../../web/app/index.html"),
    ),
    (
        "/app/index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../web/app/index.html"),
    ),
    (
        "/app/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/app/app.js"),
    ),
    (
        "/app/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/app/app.css"),
    ),
];

/// The page may load only its own files, and talk to any server (the
/// WebSocket is on another port, and files may be on object storage).
const CSP: &str = "default-src 'self'; connect-src *; img-src 'self' blob: data: https: http:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The answer for a static path, if `path` is one (`None`: not an asset).
pub fn serve(get: bool, path: &str) -> Option<Reply> {
    if path == "/app" || path == "/client" {
        let mut reply = Reply::empty(301);
        reply.headers.push(("Location", format!("{path}/")));
        return Some(reply);
    }
    let &(_, content_type, body) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    if !get {
        return Some(Reply::error(
            405,
            "method_not_allowed",
            "method not allowed on this path",
        ));
    }
    let mut reply = Reply::text(200, body);
    reply.content_type = content_type;
    reply.headers.push(("Cache-Control", "no-cache".into()));
    reply
        .headers
        .push(("X-Content-Type-Options", "nosniff".into()));
    if path.starts_with("/app/") {
        reply.headers.push(("Content-Security-Policy", CSP.into()));
    }
    Some(reply)
}
