//! A TCP proxy on 127.0.0.1:0 for the SDK tests: a fixed address for SDKs
//! whose server restarts on a new port, and fault injection on the bytes
//! (a hook after N bytes upstream, a flipped byte downstream).
//!
//! Each accepted connection is relayed to the current target by two copy
//! threads. While the target refuses connections (the server is down), an
//! accepted connection is closed at once, which a client sees as "server
//! gone". Dropping the proxy closes its listener and every relayed socket.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

/// Runs once the client → server bytes of all connections reach a count.
type Hook = Box<dyn FnOnce() + Send>;

/// State shared by the accept thread and the copy threads.
struct Inner {
    /// Where connections go.
    target: Mutex<SocketAddr>,
    /// Clones of every relayed socket, to shut them on drop or [`Proxy::cut`].
    sockets: Mutex<Vec<TcpStream>>,
    /// Set on drop.
    stop: AtomicBool,
    /// Client → server bytes relayed, over all connections.
    upstream: AtomicU64,
    /// The hook and the upstream count that fires it.
    on_upstream: Mutex<Option<(u64, Hook)>>,
    /// While set, client → server bytes are read and thrown away.
    swallow: AtomicBool,
    /// Flip (xor 0xff) the byte at this offset of every connection's
    /// server → client stream.
    corrupt_at: Mutex<Option<u64>>,
}

/// A running proxy.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Shared state.
    inner: Arc<Inner>,
    /// The accept thread.
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let inner = Arc::new(Inner {
            target: Mutex::new(target),
            sockets: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            upstream: AtomicU64::new(0),
            on_upstream: Mutex::new(None),
            swallow: AtomicBool::new(false),
            corrupt_at: Mutex::new(None),
        });
        let shared = Arc::clone(&inner);
        let accept = thread::Builder::new()
            .name("test-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    relay(&shared, client);
                }
            })
            .expect("spawn proxy");
        Proxy {
            addr,
            inner,
            accept: Some(accept),
        }
    }

    /// `http://<addr>`, for an SDK's HTTP base.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends new connections to `target`.
    pub fn set_target(&self, target: SocketAddr) {
        *self.inner.target.lock().unwrap() = target;
    }

    /// Runs `hook` once the client → server bytes (counted from now) reach
    /// `bytes`.
    pub fn on_upstream_bytes(&self, bytes: u64, hook: impl FnOnce() + Send + 'static) {
        let at = self.inner.upstream.load(Ordering::Acquire) + bytes;
        *self.inner.on_upstream.lock().unwrap() = Some((at, Box::new(hook)));
    }

    /// Removes the upstream hook, if it has not fired.
    pub fn clear_hook(&self) {
        self.inner.on_upstream.lock().unwrap().take();
    }

    /// While `on`, what clients send is read and dropped (the server hears
    /// nothing, e.g. no ACKs), while what the server sends still arrives.
    pub fn swallow_upstream(&self, on: bool) {
        self.inner.swallow.store(on, Ordering::Release);
    }

    /// Closes every relayed connection (both sides); new ones are relayed.
    pub fn cut(&self) {
        for s in self.inner.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Client → server bytes relayed so far, over all connections.
    pub fn upstream_bytes(&self) -> u64 {
        self.inner.upstream.load(Ordering::Acquire)
    }

    /// Corrupts the byte at `offset` of each later connection's server →
    /// client stream (`None`: stop corrupting).
    pub fn corrupt_downstream_at(&self, offset: Option<u64>) {
        *self.inner.corrupt_at.lock().unwrap() = offset;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        for s in self.inner.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Relays one accepted connection (or closes it if the target refuses).
fn relay(inner: &Arc<Inner>, client: TcpStream) {
    let target = *inner.target.lock().unwrap();
    let Ok(server) = TcpStream::connect(target) else {
        return; // dropped: the client sees the server gone
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let clones = (client.try_clone(), server.try_clone());
    let (Ok(client2), Ok(server2)) = clones else {
        return;
    };
    {
        let mut sockets = inner.sockets.lock().unwrap();
        sockets.retain(|s| s.peer_addr().is_ok());
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                sockets.push(c);
            }
        }
    }
    let corrupt = *inner.corrupt_at.lock().unwrap();
    let up = Arc::clone(inner);
    let swallow = Arc::clone(inner);
    thread::spawn(move || {
        copy(
            client,
            server,
            |n| count_upstream(&up, n),
            || swallow.swallow.load(Ordering::Acquire),
            None,
        )
    });
    thread::spawn(move || copy(server2, client2, |_| {}, || false, corrupt));
}

/// Adds `n` upstream bytes and fires the hook when its count is reached.
fn count_upstream(inner: &Inner, n: u64) {
    let total = inner.upstream.fetch_add(n, Ordering::AcqRel) + n;
    let mut hook = inner.on_upstream.lock().unwrap();
    if hook.as_ref().is_some_and(|(at, _)| total >= *at) {
        if let Some((_, f)) = hook.take() {
            drop(hook);
            f();
        }
    }
}

/// Copies `from` to `to` until either side ends, then shuts both; drops
/// what it reads while `swallow()` says so.
fn copy(
    mut from: TcpStream,
    mut to: TcpStream,
    on_bytes: impl Fn(u64),
    swallow: impl Fn() -> bool,
    corrupt: Option<u64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = corrupt {
            if at >= offset && at < offset + n as u64 {
                buf[(at - offset) as usize] ^= 0xff;
            }
        }
        offset += n as u64;
        if swallow() {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        on_bytes(n as u64);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
