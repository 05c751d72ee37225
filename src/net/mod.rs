//! The only user of mio: the acceptor, the event loops and their connections.
//!
//! - The acceptor thread accepts on `listen`, refuses connections past
//!   `max_connections`, and deals sockets round-robin to the event loops.
//! - Each event loop ([`worker`]) owns its connections outright: it reads
//!   until `WouldBlock`, splits frames, runs the session, and writes until
//!   `WouldBlock`. Other threads reach it only through its [`WorkerHandle`]:
//!   a lock-free queue of [`Notice`]s and one mio `Waker`, woken once per
//!   burst.

mod conn;
pub mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use crossbeam::queue::SegQueue;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::core::{ConnRef, Core};
use crate::wire::StatusCode;

/// What other threads tell an event loop.
pub enum Notice {
    /// A new connection from the acceptor.
    Accepted(TcpStream),
    /// The connection's mailbox has something (or was closed).
    Mailbox(ConnRef),
    /// The commit thread finished a SEND from this connection.
    SendDone {
        /// The sending connection.
        conn: ConnRef,
        /// The SEND's ID.
        id: u64,
        /// The SEND's destination (a user, or a group if `group`), echoed in STATUS.
        to: Arc<str>,
        /// Whether `to` names a group.
        group: bool,
        /// The answer (SENT, or the latest status of a duplicate); `None` for
        /// fire-and-forget sends, which get no answer.
        status: Option<StatusCode>,
    },
    /// Close every connection with ERROR SHUTDOWN and leave the loop.
    Shutdown,
}

/// The way into one event loop from other threads.
pub struct WorkerHandle {
    /// Wakes the loop's `poll`.
    waker: Waker,
    /// Notices waiting for the loop.
    queue: SegQueue<Notice>,
    /// Whether a wake-up is already on its way (one `wake` per burst).
    pending: AtomicBool,
}

impl WorkerHandle {
    /// Queues a notice and wakes the loop if it is not already awake.
    pub fn post(&self, notice: Notice) {
        self.queue.push(notice);
        if !self.pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "waking an event loop failed");
            }
        }
    }
}

const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(0);

/// Handles to the network threads, for shutdown.
pub struct Net {
    /// The acceptor's waker and stop flag.
    acceptor_waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    workers: Vec<thread::JoinHandle<()>>,
}

/// Starts `core.config.workers` event loops and the acceptor on `listener`.
pub fn start(core: Arc<Core>, listener: std::net::TcpListener) -> io::Result<Net> {
    let n = core.config.workers.max(1);
    let mut polls = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        handles.push(WorkerHandle {
            waker,
            queue: SegQueue::new(),
            pending: AtomicBool::new(false),
        });
        polls.push(poll);
    }
    if core.workers.set(handles).is_err() {
        return Err(io::Error::other("event loops already started"));
    }
    let mut workers = Vec::with_capacity(n);
    for (index, poll) in polls.into_iter().enumerate() {
        let core = core.clone();
        workers.push(
            thread::Builder::new()
                .name(format!("tern-loop-{index}"))
                .spawn(move || worker::run(core, index, poll))?,
        );
    }
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let acceptor_waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let (core, stop) = (core.clone(), stop.clone());
        thread::Builder::new()
            .name("tern-accept".into())
            .spawn(move || accept_loop(&core, poll, listener, &stop))?
    };
    Ok(Net {
        acceptor_waker,
        stop,
        threads: vec![acceptor],
        workers,
    })
}

impl Net {
    /// Stops accepting, closes every connection with ERROR SHUTDOWN, and
    /// waits for the network threads to finish.
    pub fn shutdown(self, core: &Core) {
        self.stop.store(true, Ordering::Release);
        let _ = self.acceptor_waker.wake();
        for t in self.threads {
            let _ = t.join();
        }
        if let Some(ws) = core.workers.get() {
            for w in ws {
                w.post(Notice::Shutdown);
            }
        }
        for t in self.workers {
            let _ = t.join();
        }
    }
}

fn accept_loop(core: &Core, mut poll: Poll, listener: TcpListener, stop: &AtomicBool) {
    let mut events = Events::with_capacity(64);
    let next = AtomicUsize::new(0);
    let workers = core.workers.get().map(|w| w.len()).unwrap_or(1);
    // After an accept error (EMFILE, ENFILE, ENOBUFS…) connections may still
    // be queued, and an edge-triggered listener will not say so again: retry
    // on a timer until accept drains to WouldBlock.
    let mut retry = false;
    while !stop.load(Ordering::Acquire) {
        let timeout = retry.then(|| std::time::Duration::from_millis(100));
        retry = false;
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "acceptor poll failed");
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let open = core.metrics.connections.load(Ordering::Relaxed);
                    if open >= core.config.max_connections as u64 {
                        tracing::warn!(%peer, open, "max_connections reached: connection refused");
                        drop(stream);
                        continue;
                    }
                    core.metrics.connections.fetch_add(1, Ordering::Relaxed);
                    let worker = next.fetch_add(1, Ordering::Relaxed) % workers;
                    core.post(worker, Notice::Accepted(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
                    retry = true;
                    break;
                }
            }
        }
    }
}

/// The address a listener is bound to, for logs.
pub fn local_addr(listener: &std::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
