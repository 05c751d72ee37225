//! The only user of mio: the acceptor, the event loops and their connections.
//!
//! - The acceptor thread accepts on `listen`, refuses connections past
//!   `max_connections`, and deals sockets round-robin to the event loops.
//! - Each event loop ([`worker`]) owns its connections outright: it reads
//!   until `WouldBlock`, splits frames, runs the session, and writes until
//!   `WouldBlock`. Other threads reach it only through [`Loops`] (the
//!   [`Notify`](crate::mailbox::Notify) port): a lock-free queue of
//!   [`Notice`]s and one mio `Waker` per loop, woken once per burst.
//! - [`glue`]: the ports the session and the commit thread are written
//!   against, implemented over the real parts.

mod conn;
pub mod glue;
pub mod worker;
pub mod ws;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use crossbeam::queue::SegQueue;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

pub use glue::{Glue, Loops, WorkerHandle};

use crate::admission::{Summary, Ticket};
use crate::clock::now_ms;
use crate::mailbox::{Answer, ConnRef};

/// What other threads tell an event loop.
pub enum Notice {
    /// A new connection from the acceptor.
    Accepted(TcpStream, Ticket),
    /// The connection's mailbox has something (or was closed).
    Mailbox(ConnRef),
    /// The commit thread answered a SEND from this connection.
    Answer(ConnRef, Answer),
    /// Close every connection with ERROR SHUTDOWN and leave the loop.
    Shutdown,
}

const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(0);

/// The event loops' handles and their polls, made before anything that
/// must reach them (the commit thread) starts; [`start`] runs the polls.
pub fn loops(n: usize) -> io::Result<(Arc<Loops>, Vec<Poll>)> {
    let mut polls = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        handles.push(WorkerHandle {
            waker,
            queue: SegQueue::new(),
            pending: AtomicBool::new(false),
        });
        polls.push(poll);
    }
    Ok((Arc::new(Loops { handles }), polls))
}

/// Handles to the network threads, for shutdown.
pub struct Net {
    /// The acceptor's waker and stop flag.
    acceptor_waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    loops: Arc<Loops>,
    threads: Vec<thread::JoinHandle<()>>,
    workers: Vec<thread::JoinHandle<()>>,
}

/// Runs one event loop per poll of `loops`, and the acceptor on `listener`.
pub fn start(
    glue: Arc<Glue>,
    loops: Arc<Loops>,
    polls: Vec<Poll>,
    listener: std::net::TcpListener,
) -> io::Result<Net> {
    let mut workers = Vec::with_capacity(polls.len());
    for (index, poll) in polls.into_iter().enumerate() {
        let (glue, loops) = (glue.clone(), loops.clone());
        workers.push(
            thread::Builder::new()
                .name(format!("tern-loop-{index}"))
                .spawn(move || worker::run(glue, loops, index, poll))?,
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
        let (glue, loops, stop) = (glue.clone(), loops.clone(), stop.clone());
        thread::Builder::new()
            .name("tern-accept".into())
            .spawn(move || accept_loop(&glue, &loops, poll, listener, &stop))?
    };
    Ok(Net {
        acceptor_waker,
        stop,
        loops,
        threads: vec![acceptor],
        workers,
    })
}

impl Net {
    /// Stops accepting, closes every connection with ERROR SHUTDOWN, and
    /// waits for the network threads to finish.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.acceptor_waker.wake();
        for t in self.threads {
            let _ = t.join();
        }
        for w in &self.loops.handles {
            w.post(Notice::Shutdown);
        }
        for t in self.workers {
            let _ = t.join();
        }
    }
}

/// Connections refused at `max_connections`, logged once per interval.
static AT_CAPACITY: Summary = Summary::new("protocol connections refused: max_connections reached");

fn accept_loop(
    glue: &Glue,
    loops: &Loops,
    mut poll: Poll,
    listener: TcpListener,
    stop: &AtomicBool,
) {
    let mut events = Events::with_capacity(64);
    let next = AtomicUsize::new(0);
    let metrics = &glue.metrics;
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
                    let open = metrics.connections.load(Ordering::Relaxed);
                    if open >= glue.config.max_connections as u64 {
                        tracing::debug!(%peer, open, "max_connections reached: connection refused");
                        AT_CAPACITY.note(now_ms());
                        drop(stream);
                        continue;
                    }
                    let ticket = match glue.conns.admit(peer.ip()) {
                        Ok(ticket) => ticket,
                        Err(why) => {
                            tracing::debug!(%peer, ?why, "connection refused");
                            glue.conns.refused.note(now_ms());
                            drop(stream);
                            continue;
                        }
                    };
                    metrics.connections.fetch_add(1, Ordering::Relaxed);
                    let worker = next.fetch_add(1, Ordering::Relaxed) % loops.len().max(1);
                    loops.post(worker, Notice::Accepted(stream, ticket));
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
