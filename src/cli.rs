//! The command-line tools of the `tern` binary besides `serve`: admin
//! commands over the HTTP API (users, groups), and user commands over the
//! protocol and the file API (send, listen, upload, download).
//!
//! Every command talks to a running server. The admin token comes from
//! `--admin-token`, `TERN_ADMIN_TOKEN`, or `<data_dir>/admin.token`; a user
//! token from `--token` or `TERN_TOKEN`. Errors are printed as one line and
//! give a non-zero exit code.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{Client, Event, Outgoing};

/// Where the server is, and the admin token.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Protocol address of the server.
    #[arg(
        long,
        env = "TERN_SERVER",
        default_value = "127.0.0.1:7700",
        global = true
    )]
    pub server: SocketAddr,
    /// HTTP address of the server.
    #[arg(
        long,
        env = "TERN_HTTP",
        default_value = "127.0.0.1:7780",
        global = true
    )]
    pub http: SocketAddr,
    /// Admin token (default: read from <data-dir>/admin.token).
    #[arg(long, env = "TERN_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
    /// Data directory of a local server, to find its admin token.
    #[arg(
        long,
        env = "TERN_DATA_DIR",
        default_value = "./tern-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Speak TLS (to the protocol and the HTTP listener), trusting the CA
    /// certificate(s) in this PEM file.
    #[arg(long, env = "TERN_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// The name the server's certificate must carry (with --ca).
    #[arg(
        long,
        env = "TERN_TLS_NAME",
        default_value = "localhost",
        global = true
    )]
    pub tls_name: String,
}

impl Target {
    /// Logs in as `token` on the protocol listener (over TLS with `--ca`).
    fn connect(&self, token: &str) -> Result<Client> {
        let mut options = crate::client::Options::default();
        if let Some(ca) = &self.ca {
            options.tls = Some(crate::client::Tls {
                config: crate::client::tls_config(ca)?,
                server_name: self
                    .tls_name
                    .clone()
                    .try_into()
                    .with_context(|| format!("--tls-name {:?}", self.tls_name))?,
            });
        }
        Client::connect_with(self.server, token, options)
            .with_context(|| format!("cannot log in at {}", self.server))
    }
}

/// `tern user …`
#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create a user (or give an existing one a new token); prints the token.
    Add {
        address: String,
        #[arg(long)]
        name: Option<String>,
        /// Token lifetime, seconds.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Delete a user: sessions closed, tokens revoked, queue deleted.
    Del { address: String },
    /// Issue another token for a user; prints it.
    Token {
        address: String,
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Show a user (online, pending).
    Show { address: String },
}

/// `tern group …`; a member is `address` or `address:send`, `address:recv`.
#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Create or replace a group with these members.
    Put { name: String, members: Vec<String> },
    /// Add (or update) members.
    Add { name: String, members: Vec<String> },
    /// Remove members.
    Remove { name: String, members: Vec<String> },
    /// Show a group.
    Show { name: String },
    /// Delete a group.
    Del { name: String },
}

/// `tern send`
#[derive(Args, Debug)]
pub struct SendArgs {
    /// Recipient address (or group name with --group).
    pub to: String,
    /// The message text.
    pub message: String,
    /// `to` names a group.
    #[arg(long)]
    pub group: bool,
    /// Message ID (default: a random non-zero ID).
    #[arg(long)]
    pub id: Option<u64>,
    /// EXPIRY in seconds (0 = real time only).
    #[arg(long)]
    pub expiry: Option<u32>,
    /// PRIORITY 0 (highest) … 15.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Wait for DELIVERED (and READ) before exiting, up to this many seconds.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    /// The sender's token (protocol send).
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Send as this user through the admin API instead of a token.
    #[arg(long, conflicts_with = "token")]
    pub from: Option<String>,
}

/// `tern listen`
#[derive(Args, Debug)]
pub struct ListenArgs {
    /// The user's token.
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Also send READ receipts.
    #[arg(long)]
    pub read: bool,
}

/// `tern upload`
#[derive(Args, Debug)]
pub struct UploadArgs {
    /// The file to upload.
    pub file: PathBuf,
    /// Content-Type to store (default application/octet-stream).
    #[arg(long)]
    pub content_type: Option<String>,
    /// A user token (default: the admin token).
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print only the signed download URL (absolute), for scripts.
    #[arg(long)]
    pub url_only: bool,
    /// Upload straight to the object store with a presigned URL (needs a
    /// server with `files_direct`), then complete the upload.
    #[arg(long)]
    pub direct: bool,
}

/// `tern download`
#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// A file id, or a URL/path as returned by upload (signed or not).
    pub file: String,
    /// Where to write (default: stdout).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// A user token (default: the admin token, unless the URL is signed).
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Target {
    fn admin(&self) -> Result<String> {
        if let Some(t) = &self.admin_token {
            return Ok(t.clone());
        }
        let path = self.data_dir.join("admin.token");
        let token = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no admin token: set TERN_ADMIN_TOKEN or --admin-token (could not read {})",
                path.display()
            )
        })?;
        Ok(token.trim().to_owned())
    }

    /// The URL of `path` on the HTTP listener: `https://` and the
    /// certificate's name with `--ca` (the agent resolves that name to
    /// `--http`).
    fn url(&self, path: &str) -> String {
        match &self.ca {
            None => format!("http://{}{path}", self.http),
            Some(_) => format!("https://{}:{}{path}", self.tls_name, self.http.port()),
        }
    }

    /// The HTTP client: over TLS trusting `--ca`, when it is given.
    fn agent(&self) -> Result<ureq::Agent> {
        Ok(match &self.ca {
            None => ureq::AgentBuilder::new().build(),
            Some(ca) => https_agent(crate::client::tls_config(ca)?, &self.tls_name, self.http),
        })
    }

    /// An HTTP call with a bearer token; returns the JSON answer (or Null).
    fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Result<Value> {
        let req = self
            .agent()?
            .request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {token}"))
            .timeout(Duration::from_secs(60));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        answer(resp, &self.http)
    }
}

/// An HTTPS client with `config` that reaches `https://{name}:{port}/…` at
/// `http` (the certificate's name need not resolve), other hosts as usual.
pub fn https_agent(
    config: std::sync::Arc<rustls::ClientConfig>,
    name: &str,
    http: SocketAddr,
) -> ureq::Agent {
    let netloc = format!("{name}:{}", http.port());
    ureq::AgentBuilder::new()
        .tls_config(config)
        .resolver(move |host: &str| -> std::io::Result<Vec<SocketAddr>> {
            if host == netloc {
                Ok(vec![http])
            } else {
                std::net::ToSocketAddrs::to_socket_addrs(host).map(Iterator::collect)
            }
        })
        .build()
}

fn answer(resp: Result<ureq::Response, ureq::Error>, http: &SocketAddr) -> Result<Value> {
    match resp {
        Ok(r) => {
            let text = r.into_string().unwrap_or_default();
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("server answered {code}: {message}")
        }
        Err(ureq::Error::Transport(t)) => bail!("cannot reach the server at {http}: {t}"),
    }
}

fn member_json(spec: &str) -> Value {
    match spec.split_once(':') {
        Some((address, "send")) => json!({"address": address, "send": true, "recv": false}),
        Some((address, "recv")) => json!({"address": address, "send": false, "recv": true}),
        _ => json!(spec),
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs a `tern user` command.
pub fn user(target: &Target, cmd: UserCmd) -> Result<()> {
    let admin = target.admin()?;
    match cmd {
        UserCmd::Add { address, name, ttl } => {
            let v = target.call(
                "POST",
                "/v1/users",
                &admin,
                Some(json!({"address": address, "name": name, "token_ttl_secs": ttl})),
            )?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        UserCmd::Del { address } => {
            target.call("DELETE", &format!("/v1/users/{address}"), &admin, None)?;
        }
        UserCmd::Token { address, ttl } => {
            let v = target.call(
                "POST",
                &format!("/v1/users/{address}/tokens"),
                &admin,
                Some(json!({"token_ttl_secs": ttl})),
            )?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        UserCmd::Show { address } => {
            print_json(&target.call("GET", &format!("/v1/users/{address}"), &admin, None)?);
        }
    }
    Ok(())
}

/// Runs a `tern group` command.
pub fn group(target: &Target, cmd: GroupCmd) -> Result<()> {
    let admin = target.admin()?;
    let v = match cmd {
        GroupCmd::Put { name, members } => {
            let members: Vec<Value> = members.iter().map(|m| member_json(m)).collect();
            target.call(
                "PUT",
                &format!("/v1/groups/{name}"),
                &admin,
                Some(json!({ "members": members })),
            )?
        }
        GroupCmd::Add { name, members } => {
            let add: Vec<Value> = members.iter().map(|m| member_json(m)).collect();
            target.call(
                "POST",
                &format!("/v1/groups/{name}/members"),
                &admin,
                Some(json!({ "add": add })),
            )?
        }
        GroupCmd::Remove { name, members } => target.call(
            "POST",
            &format!("/v1/groups/{name}/members"),
            &admin,
            Some(json!({ "remove": members })),
        )?,
        GroupCmd::Show { name } => {
            target.call("GET", &format!("/v1/groups/{name}"), &admin, None)?
        }
        GroupCmd::Del { name } => {
            target.call("DELETE", &format!("/v1/groups/{name}"), &admin, None)?
        }
    };
    if !v.is_null() {
        print_json(&v);
    }
    Ok(())
}

/// Runs `tern send`: prints the status, and with `--wait` the receipts.
pub fn send(target: &Target, args: SendArgs) -> Result<()> {
    let id = args.id.unwrap_or_else(|| rand::random::<u64>() >> 1 | 1);
    if let Some(from) = &args.from {
        let admin = target.admin()?;
        let dest = if args.group { "group" } else { "to" };
        let v = target.call(
            "POST",
            "/v1/messages",
            &admin,
            Some(json!({
                "from": from, dest: args.to, "id": id, "payload": args.message,
                "expiry": args.expiry, "priority": args.priority,
            })),
        )?;
        println!("{} id={id}", v["status"].as_str().unwrap_or("sent"));
        return Ok(());
    }
    let Some(token) = &args.token else {
        bail!("give --token (or TERN_TOKEN) to send as a user, or --from to send through the admin API");
    };
    let mut client = target.connect(token)?;
    let mut out = if args.group {
        Outgoing::to_group(&args.to, args.message.as_bytes())
    } else {
        Outgoing::to(&args.to, args.message.as_bytes())
    };
    out = out.id(id);
    out.expiry = args.expiry;
    out.priority = args.priority;
    let status = client.send_wait(&out)?;
    println!(
        "{} id={id}",
        status.name().unwrap_or("?").to_ascii_lowercase()
    );
    if status.0 >= 64 {
        bail!("message refused: {status:?}");
    }
    if args.wait > 0 {
        let deadline = std::time::Instant::now() + Duration::from_secs(args.wait);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match client.recv_new_timeout(left)? {
                Some(Event::Status(s)) => {
                    if let Some(seq) = s.seq {
                        client.ack(&[seq])?;
                    }
                    if s.id == id {
                        let who = s.member.or(s.to).unwrap_or_default();
                        println!(
                            "{} id={id} by={who}",
                            s.status.name().unwrap_or("?").to_ascii_lowercase()
                        );
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    let _ = client.bye();
    Ok(())
}

/// Runs `tern listen`: prints each delivery as a line of JSON and ACKs it.
pub fn listen(target: &Target, args: ListenArgs) -> Result<()> {
    let mut client = target.connect(&args.token)?;
    eprintln!("listening as {}", client.address);
    let keepalive = Duration::from_secs(u64::from(client.keepalive.max(2)) / 2);
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    while args.count.is_none_or(|n| seen < n) {
        let Some(event) = client.recv_new_timeout(keepalive)? else {
            client.ping(None)?;
            continue;
        };
        let line = match &event {
            Event::Msg(m) => {
                seen += 1;
                json!({
                    "seq": m.seq, "from": m.from, "group": m.group, "id": m.id, "time": m.time,
                    "type": m.msg_type, "priority": m.priority,
                    "redelivery": m.is_redelivery(),
                    "payload": String::from_utf8_lossy(&m.payload),
                })
            }
            Event::Status(s) => json!({
                "status": s.status.name().unwrap_or("?").to_ascii_lowercase(),
                "id": s.id, "to": s.to, "group": s.group, "member": s.member, "time": s.time,
            }),
            Event::Pong(_) => continue,
        };
        {
            let mut out = stdout.lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        if let Some(seq) = event.seq() {
            client.ack(&[seq])?;
        }
        if let (true, Event::Msg(m)) = (args.read, &event) {
            match &m.group {
                Some(g) => client.read_receipt_group(&m.from, m.id, g)?,
                None => client.read_receipt(&m.from, m.id)?,
            }
        }
    }
    let _ = client.bye();
    Ok(())
}

/// Runs `tern upload`: streams the file, prints the server's JSON answer.
pub fn upload(target: &Target, args: UploadArgs) -> Result<()> {
    let token = match args.token {
        Some(t) => t,
        None => target.admin()?,
    };
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let len = file.metadata()?.len();
    let content_type = args
        .content_type
        .unwrap_or_else(|| "application/octet-stream".into());
    let v = if args.direct {
        upload_direct(target, &token, file, len, &content_type)?
    } else {
        let resp = target
            .agent()?
            .post(&target.url("/v1/files"))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", &content_type)
            .set("Content-Length", &len.to_string())
            .send(std::io::BufReader::new(file));
        answer(resp, &target.http)?
    };
    if args.url_only {
        println!("{}", target.url(v["url"].as_str().unwrap_or_default()));
    } else {
        print_json(&v);
    }
    Ok(())
}

/// A direct upload: asks the server for a presigned URL, PUTs the file to
/// the object store with exactly the headers it signed, then completes.
fn upload_direct(
    target: &Target,
    token: &str,
    file: std::fs::File,
    len: u64,
    content_type: &str,
) -> Result<Value> {
    let body = json!({"direct": true, "size": len, "content_type": content_type});
    let offer = target.call("POST", "/v1/files", token, Some(body))?;
    let (Some(id), Some(url)) = (offer["id"].as_str(), offer["upload_url"].as_str()) else {
        bail!("the server did not offer a direct upload (is files_direct on?): {offer}");
    };
    // The store is another host: no token, and the system's CA roots.
    let put = ureq::AgentBuilder::new()
        .build()
        .put(url)
        .set("Content-Type", content_type)
        .set("Content-Length", &len.to_string())
        .timeout(Duration::from_secs(3600))
        .send(std::io::BufReader::new(file));
    match put {
        Ok(_) => {}
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            bail!("the object store answered {code}: {text}")
        }
        Err(ureq::Error::Transport(t)) => bail!("cannot reach the object store: {t}"),
    }
    target.call("POST", &format!("/v1/files/{id}/complete"), token, None)
}

/// Runs `tern download`: streams the file to `--output` or stdout. A server
/// with `files_direct` answers with a redirect to the object store, which
/// is followed (without the token).
pub fn download(target: &Target, args: DownloadArgs) -> Result<()> {
    let path = if args.file.starts_with("http://") || args.file.starts_with("https://") {
        args.file.clone()
    } else if args.file.starts_with('/') {
        target.url(&args.file)
    } else {
        target.url(&format!("/v1/files/{}", args.file))
    };
    let signed = path.contains("sig=");
    let mut req = target
        .agent()?
        .get(&path)
        .timeout(Duration::from_secs(3600));
    if !signed || args.token.is_some() {
        let token = match args.token {
            Some(t) => t,
            None => target.admin()?,
        };
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(e) => return answer(Err(e), &target.http).map(|_| ()),
    };
    let mut reader = resp.into_reader();
    match args.output {
        Some(p) => {
            let mut f = std::fs::File::create(&p)
                .with_context(|| format!("cannot create {}", p.display()))?;
            std::io::copy(&mut reader, &mut f)?;
            f.sync_all()?;
        }
        None => {
            std::io::copy(&mut reader.by_ref(), &mut std::io::stdout().lock())?;
        }
    }
    Ok(())
}

/// `tern gen-cert`
#[derive(Args, Debug)]
pub struct GenCertArgs {
    /// Where to write ca.pem, cert.pem and key.pem.
    #[arg(long, default_value = "./tern-tls")]
    pub out: PathBuf,
    /// A name (DNS name or IP address) the certificate is for; repeat for
    /// more.
    #[arg(long = "name", default_values = ["localhost", "127.0.0.1", "::1"])]
    pub names: Vec<String>,
    /// Replace certificate files already there.
    #[arg(long)]
    pub force: bool,
}

/// Runs `tern gen-cert`: a new CA and a certificate it signed, for trying
/// TLS (a real deployment uses a certificate from its own CA or ACME).
pub fn gen_cert(args: &GenCertArgs) -> Result<()> {
    let files = ["ca.pem", "cert.pem", "key.pem"].map(|f| args.out.join(f));
    if !args.force {
        if let Some(f) = files.iter().find(|f| f.exists()) {
            bail!("{} exists (--force replaces it)", f.display());
        }
    }
    let pki = crate::tls::Pki::generate("tern local CA", &args.names)
        .context("making the certificate")?;
    pki.write(&args.out)
        .with_context(|| format!("writing under {}", args.out.display()))?;
    let [ca, cert, key] = files;
    println!(
        "wrote {} (the CA: give it to clients, --ca), {} and {} (for {})",
        ca.display(),
        cert.display(),
        key.display(),
        args.names.join(", ")
    );
    println!(
        "serve with: tern serve --tls-cert {} --tls-key {}",
        cert.display(),
        key.display()
    );
    Ok(())
}
