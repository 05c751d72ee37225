//! A blocking client for protocol v1, on `std::net` only (no `server`
//! feature needed). Used by the CLI, the integration tests and the load
//! generator; small enough to read as a reference client.
//!
//! ```no_run
//! use tern::client::{Client, Event, Outgoing};
//! let mut c = Client::connect("127.0.0.1:7700", "token-of-alice")?;
//! let status = c.send_wait(&Outgoing::to("bob", b"hi").id(1))?;
//! loop {
//!     if let Event::Msg(m) = c.recv_new()? {
//!         println!("{}: {:?}", m.from, m.payload);
//!         c.ack(&[m.seq])?;
//!     }
//! }
//! # Ok::<(), tern::client::ClientError>(())
//! ```
//!
//! Exactly-once on the client side: the client remembers the SEQs it has
//! ACKed; [`Client::recv_new`] ACKs and skips a delivery whose SEQ it has
//! already processed (a redelivery after a reconnect or a server restart).
//! Carry that memory across connections with [`Client::reconnect`].
//!
//! Frames are cut from the socket's reads by [`wire::Deframer`], pulled one at a
//! time. This is the deframer that the `chunked` fuzz target runs.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::wire::{self, flags, DeframeError, Deframer, ErrorCode, Frame, StatusCode};

/// Bytes asked of the socket per `read`.
const READ_CHUNK: usize = 64 * 1024;

/// A TCP connection to `peer`, from local address `bind` if given.
pub fn connect(
    peer: std::net::SocketAddr,
    bind: Option<std::net::IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(local) = bind else {
        return TcpStream::connect_timeout(&peer, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(peer),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&std::net::SocketAddr::new(local, 0).into())?;
    socket.connect_timeout(&peer.into(), timeout)?;
    Ok(socket.into())
}

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("server error {code:?}: {reason}")]
    Server { code: ErrorCode, reason: String },
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server's byte stream does not cut into valid frames.
    #[error("framing: {0}")]
    Framing(#[from] DeframeError),
    #[error("timed out")]
    Timeout,
    /// TLS failed: a bad or untrusted certificate, a handshake error.
    #[error("tls: {0}")]
    Tls(String),
}

/// Result of a client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A message to send.
#[derive(Clone, Debug, Default)]
pub struct Outgoing {
    pub id: u64,
    pub to: Option<String>,
    pub group: Option<String>,
    pub expiry: Option<u32>,
    pub msg_type: Option<u32>,
    pub priority: Option<u8>,
    pub flags: Option<u32>,
    pub payload: Vec<u8>,
}

impl Outgoing {
    /// A message for user `to`.
    pub fn to(to: &str, payload: &[u8]) -> Outgoing {
        Outgoing {
            to: Some(to.to_owned()),
            payload: payload.to_vec(),
            ..Default::default()
        }
    }

    /// A message for group `group`.
    pub fn to_group(group: &str, payload: &[u8]) -> Outgoing {
        Outgoing {
            group: Some(group.to_owned()),
            payload: payload.to_vec(),
            ..Default::default()
        }
    }

    /// Sets the ID (0 = fire-and-forget).
    pub fn id(mut self, id: u64) -> Self {
        self.id = id;
        self
    }

    /// Sets EXPIRY, seconds.
    pub fn expiry(mut self, secs: u32) -> Self {
        self.expiry = Some(secs);
        self
    }

    /// Sets PRIORITY.
    pub fn priority(mut self, p: u8) -> Self {
        self.priority = Some(p);
        self
    }

    /// Sets FLAGS.
    pub fn flags(mut self, f: u32) -> Self {
        self.flags = Some(f);
        self
    }

    /// Sets TYPE.
    pub fn msg_type(mut self, t: u32) -> Self {
        self.msg_type = Some(t);
        self
    }

    fn frame(&self) -> Frame<'_> {
        Frame::Send(wire::Send {
            id: (self.id != 0).then_some(self.id),
            to: self.to.as_deref(),
            group: self.group.as_deref(),
            expiry: self.expiry,
            msg_type: self.msg_type,
            priority: self.priority,
            flags: self.flags,
            payload: Some(&self.payload),
        })
    }
}

/// A delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub seq: u64,
    pub from: String,
    pub group: Option<String>,
    pub id: u64,
    pub time: u64,
    pub msg_type: u32,
    pub priority: u8,
    pub flags: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// Whether the server says this SEQ may have been delivered before.
    pub fn is_redelivery(&self) -> bool {
        self.flags & flags::REDELIVERY != 0
    }
}

/// A status about a message this user sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusEvent {
    /// Present on stored statuses, which must be ACKed.
    pub seq: Option<u64>,
    pub id: u64,
    pub to: Option<String>,
    pub group: Option<String>,
    pub member: Option<String>,
    pub status: StatusCode,
    pub time: u64,
}

/// Something the server sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Msg(Message),
    Status(StatusEvent),
    Pong(Option<u64>),
}

impl Event {
    /// The SEQ to ACK, if any.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::Msg(m) => Some(m.seq),
            Event::Status(s) => s.seq,
            Event::Pong(_) => None,
        }
    }
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Proposed KEEPALIVE, seconds.
    pub keepalive: Option<u32>,
    /// CLIENT string.
    pub client: String,
    /// Connect and HELLO timeout.
    pub timeout: Duration,
    /// Local address to connect from (a multi-homed host; tests use other
    /// loopback addresses); `None`: the system chooses.
    pub bind: Option<std::net::IpAddr>,
    /// Speak TLS, with this configuration (see [`tls_config`]) and server
    /// name (checked against the certificate); `None`: plain TCP.
    pub tls: Option<Tls>,
}

/// TLS settings of a client connection.
#[derive(Clone, Debug)]
pub struct Tls {
    /// Trust anchors and protocol versions.
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry (a DNS name or an IP).
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// A client TLS configuration that trusts the CA certificates in the PEM
/// file `ca` (TLS 1.2 and 1.3). Errors name the file.
pub fn tls_config(ca: &std::path::Path) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |what: String| ClientError::Tls(format!("{}: {what}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// The socket, plain or under TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keepalive: None,
            client: concat!("tern-client/", env!("CARGO_PKG_VERSION")).into(),
            timeout: Duration::from_secs(10),
            bind: None,
            tls: None,
        }
    }
}

/// The largest frame body a server can send: a PAYLOAD's length is a
/// varint (at most [`wire::codec::VARINT_MAX`]), and every other field of a MSG
/// fits in [`wire::MAX_ENVELOPE`]. A header announcing more is a framing
/// error at once: nothing of it is buffered (the header's 4-byte length
/// could otherwise make the client buffer up to 4 GiB).
pub const MAX_INCOMING: u32 = wire::codec::VARINT_MAX + wire::MAX_ENVELOPE;

/// A connected, authenticated client.
pub struct Client {
    stream: Stream,
    /// What the last `read` returned. `rbuf[rpos..rend]` has not been given
    /// to the deframer yet. The frames that are whole in it are decoded in place.
    rbuf: Box<[u8]>,
    /// Start of the bytes in `rbuf` not yet deframed.
    rpos: usize,
    /// End of the bytes the last `read` put in `rbuf`.
    rend: usize,
    /// Cuts the stream into frames, and holds a frame that is split across reads.
    /// Its limit is the largest frame the protocol can carry ([`MAX_INCOMING`]),
    /// not WELCOME's MAX_FRAME, which bounds what the server accepts, not what
    /// it sends (a message stored before `max_frame` was lowered).
    deframer: Deframer,
    /// Events read while waiting for something else.
    queued: VecDeque<Event>,
    /// SEQs this client has processed (ACKed).
    seen: HashSet<u64>,
    /// Our address, from WELCOME.
    pub address: String,
    /// The server's max_frame, from WELCOME.
    pub max_frame: u32,
    /// The negotiated keepalive, from WELCOME.
    pub keepalive: u32,
    /// Server clock at WELCOME.
    pub server_time: u64,
    peer: std::net::SocketAddr,
    token: String,
    options: Options,
}

impl Client {
    /// Connects and logs in with default options.
    pub fn connect(addr: impl ToSocketAddrs, token: &str) -> Result<Client> {
        Client::connect_with(addr, token, Options::default())
    }

    /// Connects and logs in.
    pub fn connect_with(addr: impl ToSocketAddrs, token: &str, options: Options) -> Result<Client> {
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
        Client::login(addr, token, options, HashSet::new())
    }

    fn login(
        peer: std::net::SocketAddr,
        token: &str,
        options: Options,
        seen: HashSet<u64>,
    ) -> Result<Client> {
        let socket = connect(peer, options.bind, options.timeout)?;
        socket.set_nodelay(true)?;
        let stream = match &options.tls {
            None => Stream::Plain(socket),
            Some(tls) => {
                let conn =
                    rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())
                        .map_err(|e| ClientError::Tls(e.to_string()))?;
                let mut s = rustls::StreamOwned::new(conn, socket);
                // The handshake now, so that a bad certificate is a TLS error.
                s.sock.set_read_timeout(Some(options.timeout))?;
                while s.conn.is_handshaking() {
                    s.conn
                        .complete_io(&mut s.sock)
                        .map_err(|e| ClientError::Tls(e.to_string()))?;
                }
                Stream::Tls(Box::new(s))
            }
        };
        let mut c = Client {
            stream,
            rbuf: vec![0; READ_CHUNK].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            deframer: Deframer::new(MAX_INCOMING),
            queued: VecDeque::new(),
            seen,
            address: String::new(),
            max_frame: 0,
            keepalive: 0,
            server_time: 0,
            peer,
            token: token.to_owned(),
            options,
        };
        c.write(&Frame::Hello(wire::Hello {
            version: Some(wire::VERSION),
            token: Some(token),
            client: Some(&c.options.client.clone()),
            keepalive: c.options.keepalive,
        }))?;
        let deadline = Instant::now() + c.options.timeout;
        let welcome = c.next_frame(Some(deadline), |f| match f {
            Frame::Welcome(w) => Ok((
                w.address.unwrap_or("").to_owned(),
                w.max_frame.unwrap_or(0),
                w.keepalive.unwrap_or(0),
                w.time.unwrap_or(0),
            )),
            other => Err(ClientError::Protocol(format!(
                "expected WELCOME, got {:?}",
                other.kind()
            ))),
        })?;
        let Some((address, max_frame, keepalive, time)) = welcome else {
            return Err(ClientError::Timeout);
        };
        c.address = address;
        c.max_frame = max_frame;
        c.keepalive = keepalive;
        c.server_time = time;
        Ok(c)
    }

    /// A new connection with the same token, options and processed-SEQ memory.
    pub fn reconnect(self) -> Result<Client> {
        Client::login(self.peer, &self.token, self.options, self.seen)
    }

    /// Connects again after the old connection broke, keeping SEQ memory.
    pub fn reconnect_to(
        addr: std::net::SocketAddr,
        token: &str,
        seen: HashSet<u64>,
    ) -> Result<Client> {
        Client::login(addr, token, Options::default(), seen)
    }

    /// The SEQs processed so far.
    pub fn seen(&self) -> &HashSet<u64> {
        &self.seen
    }

    /// Takes the SEQ memory (to carry it to a new connection).
    pub fn into_seen(self) -> HashSet<u64> {
        self.seen
    }

    /// Writes one frame.
    pub fn write(&mut self, frame: &Frame<'_>) -> Result<()> {
        let mut buf = Vec::new();
        wire::encode(frame, &mut buf).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.write_raw(&buf)
    }

    /// Writes raw bytes (tests use this for malformed input).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Sends a message; the answer arrives as an [`Event::Status`].
    pub fn send(&mut self, msg: &Outgoing) -> Result<()> {
        self.write(&msg.frame())
    }

    /// Sends many messages in one write.
    pub fn send_many<'a>(&mut self, msgs: impl IntoIterator<Item = &'a Outgoing>) -> Result<()> {
        let mut buf = Vec::new();
        for m in msgs {
            wire::encode(&m.frame(), &mut buf).map_err(|e| ClientError::Protocol(e.to_string()))?;
        }
        self.write_raw(&buf)
    }

    /// Sends a message with an ID and waits for its immediate answer (the
    /// STATUS without SEQ); other events are kept for [`Client::recv`].
    pub fn send_wait(&mut self, msg: &Outgoing) -> Result<StatusCode> {
        self.send(msg)?;
        loop {
            let event = self.read_event(None)?.ok_or(ClientError::Timeout)?;
            match &event {
                Event::Status(s) if s.seq.is_none() && s.id == msg.id => return Ok(s.status),
                _ => self.queued.push_back(event),
            }
        }
    }

    /// ACKs deliveries and remembers them as processed.
    pub fn ack(&mut self, seqs: &[u64]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.seen.extend(seqs.iter().copied());
        self.write(&Frame::Ack(wire::Ack {
            seqs: wire::Seqs::List(seqs),
        }))
    }

    /// Sends a read receipt for message `id` from `from`.
    pub fn read_receipt(&mut self, from: &str, id: u64) -> Result<()> {
        self.write(&Frame::Read(wire::Read {
            from: Some(from),
            id: Some(id),
            group: None,
        }))
    }

    /// Sends a read receipt for message `id` that `from` sent to `group`.
    pub fn read_receipt_group(&mut self, from: &str, id: u64, group: &str) -> Result<()> {
        self.write(&Frame::Read(wire::Read {
            from: Some(from),
            id: Some(id),
            group: Some(group),
        }))
    }

    /// Sends PING.
    pub fn ping(&mut self, time: Option<u64>) -> Result<()> {
        self.write(&Frame::Ping(wire::Ping { time }))
    }

    /// Sends BYE.
    pub fn bye(&mut self) -> Result<()> {
        self.write(&Frame::Bye)
    }

    /// The next event (blocking).
    pub fn recv(&mut self) -> Result<Event> {
        match self.queued.pop_front() {
            Some(e) => Ok(e),
            None => self.read_event(None)?.ok_or(ClientError::Timeout),
        }
    }

    /// The next event, or `None` after `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Event>> {
        if let Some(e) = self.queued.pop_front() {
            return Ok(Some(e));
        }
        self.read_event(Some(Instant::now() + timeout))
    }

    /// The next event that is not a redelivery of a processed SEQ; such
    /// duplicates are ACKed again and skipped.
    pub fn recv_new(&mut self) -> Result<Event> {
        loop {
            let event = self.recv()?;
            match event.seq() {
                Some(seq) if self.seen.contains(&seq) => self.ack(&[seq])?,
                _ => return Ok(event),
            }
        }
    }

    /// Like [`Client::recv_new`] with a timeout.
    pub fn recv_new_timeout(&mut self, timeout: Duration) -> Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(event) = self.recv_timeout(left)? else {
                return Ok(None);
            };
            match event.seq() {
                Some(seq) if self.seen.contains(&seq) => self.ack(&[seq])?,
                _ => return Ok(Some(event)),
            }
        }
    }

    fn read_event(&mut self, deadline: Option<Instant>) -> Result<Option<Event>> {
        loop {
            let event = self.next_frame(deadline, |f| {
                Ok(match f {
                    Frame::Msg(m) => Some(Event::Msg(Message {
                        seq: m.seq.unwrap_or(0),
                        from: m.from.unwrap_or("").to_owned(),
                        group: m.group.map(str::to_owned),
                        id: m.id.unwrap_or(0),
                        time: m.time.unwrap_or(0),
                        msg_type: m.msg_type.unwrap_or(0),
                        priority: m.priority.unwrap_or(0),
                        flags: m.flags.unwrap_or(0),
                        payload: m.payload.unwrap_or(&[]).to_vec(),
                    })),
                    Frame::Status(s) => Some(Event::Status(StatusEvent {
                        seq: s.seq,
                        id: s.id.unwrap_or(0),
                        to: s.to.map(str::to_owned),
                        group: s.group.map(str::to_owned),
                        member: s.member.map(str::to_owned),
                        status: s.status.unwrap_or(StatusCode(0)),
                        time: s.time.unwrap_or(0),
                    })),
                    Frame::Pong(p) => Some(Event::Pong(p.time)),
                    _ => None,
                })
            })?;
            match event {
                None => return Ok(None), // timed out
                Some(Some(e)) => return Ok(Some(e)),
                Some(None) => continue, // a frame we do not surface
            }
        }
    }

    /// Returns the next frame, mapped with `f`, and reads from the socket only
    /// when every byte read so far has been deframed. Returns `Ok(None)` on
    /// timeout. An ERROR frame becomes `ClientError::Server`.
    fn next_frame<T>(
        &mut self,
        deadline: Option<Instant>,
        f: impl FnOnce(Frame<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        loop {
            let mut unread = &self.rbuf[self.rpos..self.rend];
            let before = unread.len();
            let next = self.deframer.next_frame(&mut unread);
            self.rpos += before - unread.len();
            if let Some(frame) = next? {
                if let Frame::Error(e) = &frame {
                    return Err(ClientError::Server {
                        code: e.code.unwrap_or(ErrorCode(0)),
                        reason: e.reason.unwrap_or("").to_owned(),
                    });
                }
                return f(frame).map(Some);
            }
            // No whole frame yet, and the deframer has taken every byte read.
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream.socket().set_read_timeout(timeout)?;
            match self.stream.read(&mut self.rbuf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => {
                    self.rpos = 0;
                    self.rend = n;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The underlying socket (tests use it to shut down halves).
    pub fn stream(&self) -> &TcpStream {
        self.stream.socket()
    }
}

/// Sends `msg` (which must carry an ID) until the server answers it,
/// reconnecting and resending under the same ID after a failure, up to
/// `attempts` times. The server's duplicate detection makes the retries safe.
pub fn send_with_retry(
    addr: std::net::SocketAddr,
    token: &str,
    msg: &Outgoing,
    attempts: usize,
) -> Result<StatusCode> {
    let mut last = ClientError::Timeout;
    for _ in 0..attempts.max(1) {
        match Client::connect(addr, token).and_then(|mut c| c.send_wait(msg)) {
            Ok(status) => return Ok(status),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    //! The client against a scripted fake server on 127.0.0.1, so that the
    //! deframing of real socket reads is tested without the `server` feature.

    use super::*;
    use std::net::{SocketAddr, TcpListener};
    use std::thread::{self, JoinHandle};

    fn enc(frames: &[Frame<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for frame in frames {
            wire::encode(frame, &mut out).unwrap();
        }
        out
    }

    fn welcome() -> Vec<u8> {
        enc(&[Frame::Welcome(wire::Welcome {
            version: Some(1),
            address: Some("alice"),
            time: Some(1),
            max_frame: Some(1 << 20),
            keepalive: Some(60),
        })])
    }

    fn msg(seq: u64, payload: &[u8]) -> Vec<u8> {
        enc(&[Frame::Msg(wire::Msg {
            seq: Some(seq),
            from: Some("bob"),
            payload: Some(payload),
            ..Default::default()
        })])
    }

    /// Accepts one connection, waits for a whole HELLO, then makes each of
    /// `writes` one `write` call, with a pause between them so that they
    /// arrive as separate reads. Then waits for the client to hang up.
    fn fake_server(writes: Vec<Vec<u8>>) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut hello = Vec::new();
            let mut buf = [0u8; 256];
            while wire::decode_frame(&hello, u32::MAX).is_err() {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "closed before HELLO");
                hello.extend_from_slice(&buf[..n]);
            }
            for bytes in writes {
                s.write_all(&bytes).unwrap();
                thread::sleep(Duration::from_millis(10));
            }
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        });
        (addr, server)
    }

    #[test]
    fn frames_split_across_reads_and_packed_into_one() {
        let welcome = welcome();
        let big = vec![0x5a; 3 * READ_CHUNK + 17];
        let (m1, m2, m3) = (msg(1, b"one"), msg(2, &big), msg(3, b"three"));
        let pong = enc(&[Frame::Pong(wire::Pong { time: Some(9) })]);
        let writes = vec![
            // The header of WELCOME one byte, then three bytes.
            welcome[..1].to_vec(),
            welcome[1..4].to_vec(),
            // The rest of WELCOME, all of MSG 1 and the start of MSG 2.
            [&welcome[4..], &m1, &m2[..100]].concat(),
            // MSG 2, larger than a read, then MSG 3 and PONG behind it.
            [&m2[100..], &m3, &pong].concat(),
        ];
        let (addr, server) = fake_server(writes);
        let mut c = Client::connect(addr, "token").unwrap();
        assert_eq!(c.address, "alice");
        let payloads: Vec<Vec<u8>> = (0..3)
            .map(|_| match c.recv().unwrap() {
                Event::Msg(m) => m.payload,
                other => panic!("expected MSG, got {other:?}"),
            })
            .collect();
        assert_eq!(payloads, [b"one".to_vec(), big, b"three".to_vec()]);
        assert_eq!(c.recv().unwrap(), Event::Pong(Some(9)));
        assert_eq!(c.deframer.buffered(), 0);
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_stream_that_does_not_frame_is_a_framing_error() {
        let writes = vec![[&welcome()[..], &msg(1, b"ok"), &[0x42, 0, 0, 0, 0]].concat()];
        let (addr, server) = fake_server(writes);
        let mut c = Client::connect(addr, "token").unwrap();
        assert!(matches!(c.recv(), Ok(Event::Msg(m)) if m.seq == 1));
        for _ in 0..2 {
            assert!(matches!(
                c.recv(),
                Err(ClientError::Framing(DeframeError::UnknownKind(0x42)))
            ));
        }
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_frame_larger_than_the_protocol_allows_is_refused_unbuffered() {
        let mut huge = vec![wire::Kind::MSG.0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[0u8; 64 * 1024]);
        let (addr, server) = fake_server(vec![[welcome(), huge].concat()]);
        let mut c = Client::connect(addr, "token").unwrap();
        // Not a wait for a body that never ends.
        let got = c.recv_timeout(Duration::from_secs(5));
        assert!(
            matches!(
                got,
                Err(ClientError::Framing(DeframeError::TooLarge {
                    len: u32::MAX,
                    ..
                }))
            ),
            "{got:?}"
        );
        assert_eq!(c.deframer.buffered(), 0);
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn an_error_frame_is_a_server_error() {
        let error = enc(&[Frame::Error(wire::Error {
            code: Some(ErrorCode::SHUTDOWN),
            reason: Some("bye"),
        })]);
        let (addr, server) = fake_server(vec![[welcome(), error].concat()]);
        let mut c = Client::connect(addr, "token").unwrap();
        match c.recv() {
            Err(ClientError::Server { code, reason }) => {
                assert_eq!((code, reason.as_str()), (ErrorCode::SHUTDOWN, "bye"))
            }
            other => panic!("expected a server error, got {other:?}"),
        }
        drop(c);
        server.join().unwrap();
    }
}
