//! The protocol rules, run through an in-memory [`Env`]: no socket, no
//! RocksDB, no threads. Each test drives a [`Session`] with frames and the
//! time, and reads back the frames it wrote and the requests it submitted.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::*;
use crate::admission::FREE_FAILURES;
use crate::commit::ReplyTo;
use crate::directory::{Member, SEQ_BOOT_SHIFT};
use crate::mailbox::DURABLE_CAPACITY;
use crate::store::record::encode_msg;
use crate::store::MsgView;
use crate::wire::{flags, Kind, Seqs};

const BOOT: u64 = 2;
const T0: u64 = 1_000_000;

/// Records wake-ups and answers instead of posting them to event loops.
#[derive(Default)]
struct Loops {
    woken: Mutex<Vec<ConnRef>>,
}

impl Notify for Loops {
    fn mailbox(&self, conn: ConnRef) {
        self.woken.lock().unwrap().push(conn);
    }
    fn answer(&self, _: ConnRef, _: Answer) {}
}

/// The whole server, as far as a session can tell.
struct FakeEnv {
    config: Config,
    dir: Directory,
    metrics: Metrics,
    notify: Arc<dyn Notify>,
    loops: Arc<Loops>,
    /// token → address.
    tokens: HashMap<String, String>,
    /// The store: (address, priority, SEQ) → item.
    inbox: RefCell<BTreeMap<(String, u8, u64), Arc<Item>>>,
    /// Requests handed to the commit thread.
    submitted: RefCell<Vec<Request>>,
    /// Whether the commit queue is full.
    full: Cell<bool>,
    /// Whether the store fails.
    broken: Cell<bool>,
    /// Inbox scans made.
    scans: Cell<usize>,
    /// The failed-login back-off.
    logins: Logins,
}

impl FakeEnv {
    fn new() -> FakeEnv {
        let loops = Arc::new(Loops::default());
        let env = FakeEnv {
            config: Config::default(),
            dir: Directory::new(BOOT),
            metrics: Metrics::default(),
            notify: loops.clone(),
            loops,
            tokens: HashMap::new(),
            inbox: RefCell::new(BTreeMap::new()),
            submitted: RefCell::new(Vec::new()),
            full: Cell::new(false),
            broken: Cell::new(false),
            scans: Cell::new(0),
            logins: Logins::default(),
        };
        env.with_users(&["alice", "bob", "carol"])
    }

    fn with_users(mut self, users: &[&str]) -> FakeEnv {
        for u in users {
            self.dir
                .insert_user(Arc::new(User::new(u, String::new(), BOOT)));
            self.tokens.insert(format!("tok-{u}"), u.to_string());
        }
        self
    }

    /// Stores an item for `user`, as the commit thread would.
    fn store(&self, user: &str, priority: u8, id: u64) -> Arc<Item> {
        let u = self.dir.user(user).unwrap();
        let item = Arc::new(Item {
            seq: u.next_seq(),
            priority,
            ephemeral: false,
            record: msg_record("carol", id, T0 + 3_600_000),
            born_us: 0,
            pushed_us: Default::default(),
            group_ref: None,
            settle_hint: Default::default(),
        });
        self.inbox
            .borrow_mut()
            .insert((user.into(), priority, item.seq), item.clone());
        item
    }

    fn take_submitted(&self) -> Vec<Request> {
        std::mem::take(&mut *self.submitted.borrow_mut())
    }
}

impl Env for FakeEnv {
    fn config(&self) -> &Config {
        &self.config
    }
    fn logins(&self) -> &Logins {
        &self.logins
    }
    fn directory(&self) -> &Directory {
        &self.dir
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn notify(&self) -> &Arc<dyn Notify> {
        &self.notify
    }
    fn authenticate(&self, token: &str, _now: u64) -> Result<Option<Arc<User>>, StoreError> {
        if self.broken.get() {
            return Err(StoreError::Corrupt {
                cf: "tokens",
                what: "broken on purpose".into(),
            });
        }
        Ok(self.tokens.get(token).and_then(|a| self.dir.user(a)))
    }
    fn scan_inbox(
        &self,
        user: &str,
        cursors: &[u64; PRIORITIES],
        budget: usize,
    ) -> Result<(Vec<Arc<Item>>, bool), StoreError> {
        self.scans.set(self.scans.get() + 1);
        let inbox = self.inbox.borrow();
        let mut items = Vec::new();
        for ((u, p, seq), item) in inbox.iter() {
            if u == user && *seq > cursors[usize::from(*p)] {
                if items.len() == budget {
                    return Ok((items, false));
                }
                items.push(item.clone());
            }
        }
        Ok((items, true))
    }
    fn submit(&self, req: Request) -> Result<(), Full> {
        if self.full.get() {
            return Err(Full(Box::new(req)));
        }
        self.submitted.borrow_mut().push(req);
        Ok(())
    }
}

fn msg_record(from: &str, id: u64, expire_at: u64) -> Arc<[u8]> {
    encode_msg(&MsgView {
        time: T0,
        expire_at,
        id,
        msg_type: 0,
        flags: flags::SEND_DEFAULT,
        from,
        group: None,
        payload: b"payload",
    })
}

/// A frame the session wrote, decoded and owned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Out {
    Welcome { address: String, keepalive: u32 },
    Msg { seq: u64, id: u64, redelivery: bool },
    Status { id: u64, status: StatusCode },
    Pong(Option<u64>),
    Error(ErrorCode),
}

/// One connection under test.
struct Conn {
    session: Session,
    out: Vec<u8>,
    /// Frames decoded but not yet looked at by the test.
    backlog: Vec<Out>,
    me: ConnRef,
    now: u64,
}

impl Conn {
    fn new(env: &FakeEnv, token: usize) -> Conn {
        Conn {
            session: Session::new(T0, &env.config, None),
            out: Vec::new(),
            backlog: Vec::new(),
            me: ConnRef {
                worker: 0,
                token,
                generation: token as u64,
            },
            now: T0,
        }
    }

    fn call<R>(&mut self, env: &FakeEnv, f: impl FnOnce(&mut Session, &mut Ctx<'_>) -> R) -> R {
        let mut ctx = Ctx {
            env,
            out: &mut self.out,
            now: self.now,
            now_us: 0,
            me: self.me,
        };
        f(&mut self.session, &mut ctx)
    }

    fn frame(&mut self, env: &FakeEnv, frame: Frame<'_>) -> Flow {
        self.session.on_read(self.now);
        self.call(env, |s, ctx| s.handle_frame(ctx, frame))
    }

    fn hello(&mut self, env: &FakeEnv, token: &str) -> Flow {
        self.frame(
            env,
            Frame::Hello(wire::Hello {
                version: Some(wire::VERSION),
                token: Some(token),
                client: None,
                keepalive: Some(30),
            }),
        )
    }

    fn login(env: &FakeEnv, user: &str, slot: usize) -> Conn {
        let mut c = Conn::new(env, slot);
        assert_eq!(c.hello(env, &format!("tok-{user}")), Flow::Continue);
        let mut frames = c.written();
        assert!(matches!(frames.first(), Some(Out::Welcome { .. })));
        frames.remove(0);
        c.backlog = frames;
        c
    }

    fn ack(&mut self, env: &FakeEnv, seqs: &[u64]) -> Flow {
        self.frame(
            env,
            Frame::Ack(wire::Ack {
                seqs: Seqs::List(seqs),
            }),
        )
    }

    fn send(&mut self, env: &FakeEnv, to: &str, id: u64, expiry: Option<u32>) -> Flow {
        self.frame(
            env,
            Frame::Send(wire::Send {
                id: Some(id),
                to: Some(to),
                expiry,
                payload: Some(b"hi"),
                ..Default::default()
            }),
        )
    }

    /// Decodes and clears what the session wrote.
    fn written(&mut self) -> Vec<Out> {
        let mut frames = std::mem::take(&mut self.backlog);
        let mut buf = &self.out[..];
        while !buf.is_empty() {
            let (frame, used) =
                wire::decode_frame(buf, u32::MAX).expect("the session writes whole, valid frames");
            frames.push(match frame {
                Frame::Welcome(w) => Out::Welcome {
                    address: w.address.unwrap_or("").into(),
                    keepalive: w.keepalive.unwrap_or(0),
                },
                Frame::Msg(m) => Out::Msg {
                    seq: m.seq.unwrap_or(0),
                    id: m.id.unwrap_or(0),
                    redelivery: m.flags.unwrap_or(0) & flags::REDELIVERY != 0,
                },
                Frame::Status(s) => Out::Status {
                    id: s.id.unwrap_or(0),
                    status: s.status.unwrap_or(StatusCode(0)),
                },
                Frame::Pong(p) => Out::Pong(p.time),
                Frame::Error(e) => Out::Error(e.code.unwrap_or(ErrorCode(0))),
                other => panic!("the server never writes {:?}", other.kind()),
            });
            buf = &buf[used..];
        }
        self.out.clear();
        frames
    }

    fn msgs(&mut self) -> Vec<(u64, u64, bool)> {
        self.written()
            .into_iter()
            .filter_map(|o| match o {
                Out::Msg {
                    seq,
                    id,
                    redelivery,
                } => Some((seq, id, redelivery)),
                _ => None,
            })
            .collect()
    }

    fn error(&mut self) -> Option<ErrorCode> {
        self.written().into_iter().find_map(|o| match o {
            Out::Error(code) => Some(code),
            _ => None,
        })
    }
}

// ---- HELLO and login errors ----

#[test]
fn hello_logs_in_and_negotiates_the_keepalive() {
    let env = FakeEnv::new();
    let mut c = Conn::new(&env, 1);
    assert_eq!(c.hello(&env, "tok-alice"), Flow::Continue);
    let max = env.config.keepalive.min(30);
    assert_eq!(
        c.written(),
        [Out::Welcome {
            address: "alice".into(),
            keepalive: max
        }]
    );
    assert!(c.session.is_authenticated());
    let alice = env.dir.user("alice").unwrap();
    assert_eq!(alice.attached.load().as_ref().map(|m| m.owner), Some(c.me));
    assert_eq!(c.session.poll_timeout(), T0 + u64::from(max) * 1500);
}

#[test]
fn the_first_frame_must_be_hello() {
    let env = FakeEnv::new();
    let mut c = Conn::new(&env, 1);
    assert_eq!(
        c.frame(&env, Frame::Ping(wire::Ping { time: None })),
        Flow::Close
    );
    assert_eq!(c.error(), Some(ErrorCode::NOT_AUTHENTICATED));
}

#[test]
fn no_hello_in_time_is_not_authenticated() {
    let env = FakeEnv::new();
    let mut c = Conn::new(&env, 1);
    let deadline = c.session.poll_timeout();
    assert_eq!(deadline, T0 + u64::from(env.config.hello_timeout) * 1000);
    c.now = deadline - 1;
    assert_eq!(c.call(&env, |s, ctx| s.handle_timeout(ctx)), Flow::Continue);
    assert!(c.written().is_empty());
    c.now = deadline;
    assert_eq!(c.call(&env, |s, ctx| s.handle_timeout(ctx)), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::NOT_AUTHENTICATED));
}

#[test]
fn a_wrong_or_missing_version_is_unsupported() {
    let env = FakeEnv::new();
    for version in [None, Some(2)] {
        let mut c = Conn::new(&env, 1);
        let hello = wire::Hello {
            version,
            token: Some("tok-alice"),
            ..Default::default()
        };
        assert_eq!(c.frame(&env, Frame::Hello(hello)), Flow::Close);
        assert_eq!(c.error(), Some(ErrorCode::UNSUPPORTED_VERSION));
    }
}

#[test]
fn an_address_that_keeps_failing_is_refused_unchecked_for_a_while() {
    let env = FakeEnv::new();
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let conn_from = |token: usize, ip| {
        let mut c = Conn::new(&env, token);
        c.session = Session::new(T0, &env.config, Some(ip));
        c
    };
    for t in 0..=FREE_FAILURES as usize {
        let mut c = conn_from(t, ip);
        assert_eq!(c.hello(&env, "tok-mallory"), Flow::Close);
        assert_eq!(c.error(), Some(ErrorCode::AUTH_FAILED));
    }
    // Backing off: even a good token is refused, without being looked at.
    let mut c = conn_from(100, ip);
    assert_eq!(c.hello(&env, "tok-alice"), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::AUTH_FAILED));
    assert!(env.dir.user("alice").unwrap().attached.load().is_none());
    // Another address logs in; and so does this one once the wait is over.
    let mut c = conn_from(101, "192.0.2.8".parse().unwrap());
    c.hello(&env, "tok-alice");
    assert!(c.session.is_authenticated());
    let mut c = conn_from(102, ip);
    c.now = T0 + 1000;
    c.hello(&env, "tok-alice");
    assert!(c.session.is_authenticated());
}

#[test]
fn unknown_missing_or_uncheckable_tokens_fail() {
    let env = FakeEnv::new();
    let mut c = Conn::new(&env, 1);
    assert_eq!(c.hello(&env, "tok-mallory"), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::AUTH_FAILED));
    let mut c = Conn::new(&env, 2);
    let hello = wire::Hello {
        version: Some(wire::VERSION),
        ..Default::default()
    };
    assert_eq!(c.frame(&env, Frame::Hello(hello)), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::AUTH_FAILED));
    env.broken.set(true);
    let mut c = Conn::new(&env, 3);
    assert_eq!(c.hello(&env, "tok-alice"), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::AUTH_FAILED));
    assert!(env.dir.user("alice").unwrap().attached.load().is_none());
}

#[test]
fn a_long_client_string_is_a_protocol_error() {
    let env = FakeEnv::new();
    let mut c = Conn::new(&env, 1);
    let client = "x".repeat(MAX_TEXT + 1);
    let hello = wire::Hello {
        version: Some(wire::VERSION),
        token: Some("tok-alice"),
        client: Some(&client),
        keepalive: None,
    };
    assert_eq!(c.frame(&env, Frame::Hello(hello)), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn hello_twice_is_a_protocol_error() {
    let env = FakeEnv::new();
    let mut c = Conn::login(&env, "alice", 1);
    assert_eq!(c.hello(&env, "tok-alice"), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn server_to_client_frames_from_a_client_are_protocol_errors() {
    let env = FakeEnv::new();
    let frames = [
        Frame::Welcome(wire::Welcome::default()),
        Frame::Msg(wire::Msg::default()),
        Frame::Status(wire::Status::default()),
        Frame::Pong(wire::Pong::default()),
        Frame::Error(wire::Error::default()),
    ];
    for (i, frame) in frames.into_iter().enumerate() {
        let mut c = Conn::login(&env, "alice", 10 + i);
        let kind = frame.kind();
        assert_eq!(c.frame(&env, frame), Flow::Close, "{kind:?}");
        assert_eq!(c.error(), Some(ErrorCode::PROTOCOL_ERROR), "{kind:?}");
    }
}

#[test]
fn a_second_login_replaces_the_first() {
    let env = FakeEnv::new();
    let mut first = Conn::login(&env, "alice", 1);
    let _second = Conn::login(&env, "alice", 2);
    // The first connection's mailbox was closed and its loop woken.
    assert!(env.loops.woken.lock().unwrap().contains(&first.me));
    assert_eq!(
        first.call(&env, |s, ctx| s.handle_mailbox(ctx)),
        Flow::Close
    );
    assert_eq!(first.error(), Some(ErrorCode::REPLACED));
    // Closing the replaced connection leaves the new one attached.
    first.session.on_close();
    let attached = env.dir.user("alice").unwrap().attached.load_full();
    assert_eq!(attached.map(|m| m.owner.token), Some(2));
}

#[test]
fn a_mailbox_closed_by_the_admin_closes_with_its_code() {
    let env = FakeEnv::new();
    let mut c = Conn::login(&env, "alice", 1);
    let mb = env.dir.user("alice").unwrap().mailbox().unwrap();
    mb.close(ErrorCode::AUTH_FAILED);
    assert_eq!(c.call(&env, |s, ctx| s.handle_mailbox(ctx)), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::AUTH_FAILED));
}

// ---- keepalive, PING, BYE ----

#[test]
fn ping_is_answered_and_silence_is_an_idle_timeout() {
    let env = FakeEnv::new();
    let mut c = Conn::login(&env, "alice", 1);
    assert_eq!(
        c.frame(&env, Frame::Ping(wire::Ping { time: Some(42) })),
        Flow::Continue
    );
    assert_eq!(c.written(), [Out::Pong(Some(42))]);
    let keepalive = env.config.keepalive.min(30);
    let idle = c.session.poll_timeout();
    assert_eq!(idle, T0 + u64::from(keepalive) * 1500);
    // Input moves the deadline.
    c.now = T0 + 1000;
    c.frame(&env, Frame::Ping(wire::Ping { time: None }));
    c.written();
    assert_eq!(c.session.poll_timeout(), idle + 1000);
    c.now = idle + 999;
    assert_eq!(c.call(&env, |s, ctx| s.handle_timeout(ctx)), Flow::Continue);
    c.now += 1;
    assert_eq!(c.call(&env, |s, ctx| s.handle_timeout(ctx)), Flow::Close);
    assert_eq!(c.error(), Some(ErrorCode::IDLE_TIMEOUT));
}

#[test]
fn bye_closes_without_an_error() {
    let env = FakeEnv::new();
    let mut c = Conn::login(&env, "alice", 1);
    assert_eq!(c.frame(&env, Frame::Bye), Flow::Close);
    assert_eq!(c.written(), []);
    c.session.on_close();
    assert!(env.dir.user("alice").unwrap().attached.load().is_none());
}

// ---- SEND ----

#[test]
fn a_stored_send_is_queued_and_answered_after_commit() {
    let env = FakeEnv::new();
    let mut c = Conn::login(&env, "alice", 1);
    assert_eq!(c.send(&env, "bob", 7, None), Flow::Continue);
    assert_eq!(c.written(), [], "nothing is said before the commit");
    let reqs = env.take_submitted();
    let [Request::Send(s)] = &reqs[..] else {
        panic!("one SEND request expected");
    };
    assert_eq!((s.accept.id, &*s.recipient.address), (7, "bob"));
    assert!(matches!(s.accept.conn, ReplyTo::Conn(me) if me == c.me));
    assert_eq!(c.session.pending_sends, 1);
    let answer = Answer {
        id: 7,
        to: "bob".into(),
        group: false,
        status: Some(StatusCode::SENT),
    };
    c.call(&env, |s, ctx| s.handle_answer(ctx, &answer));
    assert_eq!(
        c.written(),
        [Out::Status {
            id: 7,
            status: StatusCode::SENT
        }]
    );
    assert_eq!(c.session.pending_sends, 0);
}

#[test]
fn send_errors_are_answered_at_once() {
    let env = FakeEnv::new();
    let mut c = Conn::login(&env, "alice", 1);
    c.send(&env, "nobody", 1, None);
    assert_eq!(
        c.written(),
        [Out::Status {
            id: 1,
            status: StatusCode::INVALID_DEST
        }]
    );
    c.frame(
        &env,
        Frame::Send(wire::Send {
            id: Some(2),
            to: Some("bob"),
            priority: Some(16),
            ..Default::default()
        }),
    );
    assert_eq!(
        c.written(),
        [Out::Status {
            id: 2,
            status: StatusCode::BAD_REQUEST
        }]
    );
    let big = vec![0u8; env.config.max_payload as usize + 1];
    c.frame(
        &env,
        Frame::Send(wire::Send {
            id: Some(3),
            to: Some("bob"),
            payload: Some(&big),
            ..Default::default()
        }),
    );
    assert_eq!(
        c.written(),
        [Out::Status {
            id: 3,
            status: StatusCode::TOO_LARGE
        }]
    );
    c.frame(
        &env,
        Frame::Send(wire::Send {
            id: Some(4),
            group: Some("nogroup"),
            ..Default::default()
        }),
    );
    assert_eq!(
        c.written(),
        [Out::Status {
            id: 4,
            status: StatusCode::INVALID_DEST
        }]
    );
    // A full commit queue is OVERLOADED, and the loop does not block.
    env.full.set(true);
    c.send(&env, "bob", 5, None);
    assert_eq!(
        c.written(),
        [Out::Status {
            id: 5,
            status: StatusCode::OVERLOADED
        }]
    );
    // Fire-and-forget gets no status at all, even an error.
    c.send(&env, "nobody", 0, None);
    assert_eq!(c.written(), []);
    assert!(env.take_submitted().is_empty());
}

#[test]
fn a_group_send_needs_the_send_permission() {
    let env = FakeEnv::new();
    let member = |a: &str, send| Member {
        user: env.dir.user(a).unwrap(),
        send,
        recv: true,
    };
    env.dir.publish_group(
        "team".into(),
        vec![member("alice", false), member("bob", true)],
    );
    let mut c = Conn::login(&env, "alice", 1);
    let send = wire::Send {
        id: Some(1),
        group: Some("team"),
        ..Default::default()
    };
    c.frame(&env, Frame::Send(send.clone()));
    assert_eq!(
        c.written(),
        [Out::Status {
            id: 1,
            status: StatusCode::NOT_MEMBER
        }]
    );
    let mut b = Conn::login(&env, "bob", 2);
    b.frame(&env, Frame::Send(send));
    let reqs = env.take_submitted();
    let [Request::GroupSend(g)] = &reqs[..] else {
        panic!("one group SEND expected");
    };
    // The members with recv, less the sender.
    let to: Vec<&str> = g.recipients().map(|u| &*u.address).collect();
    assert_eq!(to, ["alice"]);
}

/// Real-time group sends draw on the connection's reach budget (the
/// members walked in the event loop): past it, OVERLOADED without a walk,
/// and the budget refills with time. Stored group sends go to the commit
/// thread, which bounds its batches' reach itself.
#[test]
fn real_time_group_sends_are_bounded_by_the_members_they_reach() {
    use crate::directory::REALTIME_REACH_PER_SEC;
    const MEMBERS: u64 = 1_000;
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let env = FakeEnv::new().with_users(&refs);
    let mut members: Vec<Member> = names
        .iter()
        .map(|a| Member {
            user: env.dir.user(a).unwrap(),
            send: false,
            recv: true,
        })
        .collect();
    members.push(Member {
        user: env.dir.user("alice").unwrap(),
        send: true,
        recv: true,
    });
    members.sort_by(|a, b| a.user.address.cmp(&b.user.address));
    env.dir.publish_group("big".into(), members);
    let mut alice = Conn::login(&env, "alice", 1);
    let send = |c: &mut Conn, id: u64| {
        c.frame(
            &env,
            Frame::Send(wire::Send {
                id: Some(id),
                group: Some("big"),
                expiry: Some(0),
                ..Default::default()
            }),
        );
        match &c.written()[..] {
            [Out::Status { status, .. }] => *status,
            other => panic!("{other:?}"),
        }
    };
    // The group has 1,001 members: the budget allows this many sends at once.
    let at_once = REALTIME_REACH_PER_SEC as u64 / (MEMBERS + 1);
    for id in 1..=at_once {
        assert_eq!(send(&mut alice, id), StatusCode::OFFLINE, "send {id}");
    }
    assert_eq!(send(&mut alice, 0xff), StatusCode::OVERLOADED);
    assert_eq!(send(&mut alice, 0xfe), StatusCode::OVERLOADED);
    // Two milliseconds refill 2,000: one more send.
    alice.now += 2;
    assert_eq!(send(&mut alice, 0xfd), StatusCode::OFFLINE);
    assert_eq!(send(&mut alice, 0xfc), StatusCode::OVERLOADED);
    // The budget is the user's: a new connection does not refill it.
    let now = alice.now;
    let mut again = Conn::login(&env, "alice", 2);
    again.now = now;
    assert_eq!(send(&mut again, 0xfa), StatusCode::OVERLOADED);
    // A stored group send is not counted here.
    alice.frame(
        &env,
        Frame::Send(wire::Send {
            id: Some(0xfb),
            group: Some("big"),
            ..Default::default()
        }),
    );
    assert!(matches!(&env.take_submitted()[..], [Request::GroupSend(_)]));
}

#[test]
fn real_time_sends_go_to_connected_recipients_only() {
    let env = FakeEnv::new();
    let mut alice = Conn::login(&env, "alice", 1);
    alice.send(&env, "bob", 1, Some(0));
    assert_eq!(
        alice.written(),
        [Out::Status {
            id: 1,
            status: StatusCode::OFFLINE
        }]
    );
    let mut bob = Conn::login(&env, "bob", 2);
    alice.send(&env, "bob", 2, Some(0));
    assert_eq!(
        alice.written(),
        [Out::Status {
            id: 2,
            status: StatusCode::SENT
        }]
    );
    assert!(
        env.take_submitted().is_empty(),
        "real time never touches the store"
    );
    assert!(env.loops.woken.lock().unwrap().contains(&bob.me));
    bob.call(&env, |s, ctx| s.handle_mailbox(ctx));
    let msgs = bob.msgs();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].1, 2);
    // The ACK settles it here, with a live DELIVERED to alice.
    bob.ack(&env, &[msgs[0].0]);
    assert!(env.take_submitted().is_empty());
    alice.call(&env, |s, ctx| s.handle_mailbox(ctx));
    assert_eq!(
        alice.written(),
        [Out::Status {
            id: 2,
            status: StatusCode::DELIVERED
        }]
    );
}

#[test]
fn too_many_pending_sends_stop_reading() {
    let env = FakeEnv::new();
    let mut c = Conn::login(&env, "alice", 1);
    for id in 1..=MAX_PENDING_SENDS as u64 {
        assert!(c.session.wants_read(0, 1 << 20));
        c.send(&env, "bob", id, None);
    }
    assert!(!c.session.wants_read(0, 1 << 20));
}

// ---- delivery, ACK, READ ----

#[test]
fn catch_up_then_live_delivers_everything_once_in_order() {
    let env = FakeEnv::new();
    let a = env.store("bob", 3, 1);
    let b = env.store("bob", 0, 2);
    let mut bob = Conn::login(&env, "bob", 1);
    // Stored items come by scan, highest priority (0) first.
    assert_eq!(bob.msgs(), [(b.seq, 2, false), (a.seq, 1, false)]);
    // Now live: a new item arrives through the mailbox (and the store).
    let c = env.store("bob", 0, 3);
    let mb = env.dir.user("bob").unwrap().mailbox().unwrap();
    assert!(mb.push_durable(c.clone()));
    let scans = env.scans.get();
    bob.call(&env, |s, ctx| s.handle_mailbox(ctx));
    assert_eq!(bob.msgs(), [(c.seq, 3, false)]);
    assert_eq!(env.scans.get(), scans, "live: no store scan");
    // Seen again by a stray push: skipped (at or below the cursor).
    assert!(mb.push_durable(c));
    bob.call(&env, |s, ctx| s.handle_mailbox(ctx));
    assert_eq!(bob.msgs(), []);
}

#[test]
fn overflow_falls_back_to_the_store_and_loses_nothing() {
    let mut env = FakeEnv::new();
    env.config.max_inflight = 100_000;
    env.config.conn_buffer = 64 << 20;
    let mut bob = Conn::login(&env, "bob", 1);
    assert_eq!(bob.msgs(), []);
    let mb = env.dir.user("bob").unwrap().mailbox().unwrap();
    let n = DURABLE_CAPACITY as u64 + 10;
    for id in 1..=n {
        let item = env.store("bob", 0, id);
        mb.push_durable(item);
    }
    assert!(mb.overflowed());
    // Until everything is taken, a pump goes on from the store.
    let mut ids = Vec::new();
    for _ in 0..10 {
        bob.call(&env, |s, ctx| s.handle_mailbox(ctx));
        ids.extend(bob.msgs().into_iter().map(|(_, id, _)| id));
    }
    assert_eq!(ids, (1..=n).collect::<Vec<_>>());
    assert!(!mb.overflowed());
}

#[test]
fn the_window_holds_deliveries_until_acked() {
    let mut env = FakeEnv::new();
    env.config.max_inflight = 2;
    for id in 1..=3 {
        env.store("bob", 0, id);
    }
    let mut bob = Conn::login(&env, "bob", 1);
    let first = bob.msgs();
    assert_eq!(first.len(), 2);
    bob.ack(&env, &[first[0].0]);
    // The ACK is at the commit thread: the window stays full until it settles.
    assert_eq!(bob.msgs(), []);
    env.dir.user("bob").unwrap().settled(first[0].0);
    bob.call(&env, |s, ctx| s.handle_mailbox(ctx));
    assert_eq!(bob.msgs().len(), 1);
}

/// The (SEQ, priority) of each item ACKed, if `reqs` is one ACK request.
fn one_ack(reqs: &[Request]) -> Option<Vec<(u64, u8)>> {
    match reqs {
        [Request::Ack { items, .. }] => Some(items.iter().map(|a| (a.seq, a.priority)).collect()),
        _ => None,
    }
}

/// Bob, logged in, got one stored item and ACKed it while the commit queue
/// was full: the ACK is kept, not submitted. Returns his connection and the
/// item's SEQ.
fn refused_ack(env: &FakeEnv) -> (Conn, u64) {
    let item = env.store("bob", 0, 1);
    let mut bob = Conn::login(env, "bob", 1);
    bob.msgs();
    env.full.set(true);
    bob.ack(env, &[item.seq]);
    assert!(env.take_submitted().is_empty());
    (bob, item.seq)
}

#[test]
fn an_ack_flood_costs_one_commit_request() {
    let env = FakeEnv::new();
    let item = env.store("bob", 0, 1);
    let mut bob = Conn::login(&env, "bob", 1);
    assert_eq!(bob.msgs().len(), 1);
    for _ in 0..1000 {
        bob.ack(&env, &[item.seq, item.seq]);
    }
    assert_eq!(one_ack(&env.take_submitted()), Some(vec![(item.seq, 0)]));
    // An ACK for nothing written is ignored.
    bob.ack(&env, &[999]);
    assert!(env.take_submitted().is_empty());
}

/// ACKs refused by a full commit queue are the user's, not the
/// connection's: the next connection offers them. Else their in-flight
/// entries stayed marked as ACKed, the new connection's ACKs of the items
/// written again were ignored, and the items held their window slots
/// until a restart.
#[test]
fn acks_refused_by_a_full_queue_outlive_their_connection() {
    let env = FakeEnv::new();
    let (mut bob, seq) = refused_ack(&env);
    bob.session.on_close();
    env.full.set(false);
    let mut again = Conn::login(&env, "bob", 2);
    // Its ACK is kept: the item is not written again.
    assert_eq!(again.msgs(), []);
    // The new connection's timer offers the kept ACK at once.
    assert!(again.session.poll_timeout() <= again.now);
    again.call(&env, |s, ctx| s.handle_timeout(ctx));
    assert_eq!(one_ack(&env.take_submitted()), Some(vec![(seq, 0)]));
    // The client ACKs it again (it kept what the first connection got):
    // that ACK is not sent twice.
    again.ack(&env, &[seq]);
    assert!(env.take_submitted().is_empty());
    assert!(again.session.poll_timeout() > again.now);
}

/// A reconnect while an ACK is at the commit thread does not write its
/// item again: the ACK settles it (or, if its write fails, the item is
/// owed again: the next test). The new connection used to write it
/// again, flagged REDELIVERY: a copy of what the client had ACKed.
#[test]
fn a_reconnect_does_not_write_again_what_an_ack_is_settling() {
    let env = FakeEnv::new();
    let item = env.store("bob", 0, 1);
    let mut first = Conn::login(&env, "bob", 1);
    assert_eq!(first.msgs(), [(item.seq, 1, false)]);
    first.ack(&env, &[item.seq]);
    assert_eq!(one_ack(&env.take_submitted()), Some(vec![(item.seq, 0)]));
    first.session.on_close();
    // The item is still stored and in flight: neither is written.
    let mut second = Conn::login(&env, "bob", 2);
    assert_eq!(second.msgs(), []);
    // The ACK's completion.
    env.dir.user("bob").unwrap().settled(item.seq);
    env.inbox.borrow_mut().clear();
    second.call(&env, |s, ctx| s.handle_mailbox(ctx));
    assert_eq!(second.msgs(), []);
    assert!(env.take_submitted().is_empty());
}

/// An ACK whose write failed at the commit thread: the item is still
/// queued, and the client did ACK it. The server offers the ACK again
/// itself, a while later (a store that failed a write refuses writes until
/// it is reopened), on this connection or the next one, and writes the item
/// to no one again: not a copy of what the client ACKed, and not a loop of
/// copies and ACKs while the store stays broken.
#[test]
fn an_ack_whose_write_failed_is_offered_again_later() {
    let env = FakeEnv::new();
    let item = env.store("bob", 0, 1);
    let bob = env.dir.user("bob").unwrap();
    let mut conn = Conn::login(&env, "bob", 1);
    conn.msgs();
    conn.ack(&env, &[item.seq]);
    assert_eq!(one_ack(&env.take_submitted()), Some(vec![(item.seq, 0)]));
    for _ in 0..3 {
        // The commit thread's completion of the failed write.
        bob.ack_failed(item.seq, conn.now);
        assert!(env.loops.woken.lock().unwrap().contains(&conn.me));
        conn.call(&env, |s, ctx| s.handle_mailbox(ctx));
        assert_eq!(conn.msgs(), []);
        // Not before its time, even if the client ACKs it again.
        let at = conn.session.poll_timeout();
        assert!(at >= bob.ack_retry_at() && bob.ack_retry_at() > conn.now);
        conn.ack(&env, &[item.seq]);
        assert!(env.take_submitted().is_empty());
        conn.now = bob.ack_retry_at();
        conn.call(&env, |s, ctx| s.handle_timeout(ctx));
        assert_eq!(one_ack(&env.take_submitted()), Some(vec![(item.seq, 0)]));
        assert_eq!(conn.msgs(), []);
        conn.call(&env, |s, ctx| s.handle_mailbox(ctx));
        assert_eq!(conn.msgs(), []);
    }
    // It fails again, and the connection closes: the next one offers it.
    bob.ack_failed(item.seq, conn.now);
    conn.session.on_close();
    let mut again = Conn::login(&env, "bob", 2);
    again.now = conn.now;
    assert_eq!(again.msgs(), []);
    again.now = bob.ack_retry_at();
    again.call(&env, |s, ctx| s.handle_timeout(ctx));
    assert_eq!(one_ack(&env.take_submitted()), Some(vec![(item.seq, 0)]));
    // Its completion.
    bob.settled(item.seq);
    again.call(&env, |s, ctx| s.handle_mailbox(ctx));
    assert_eq!(again.msgs(), []);
}

#[test]
fn acks_refused_by_a_full_queue_are_retried_not_dropped() {
    let env = FakeEnv::new();
    let (mut bob, seq) = refused_ack(&env);
    let retry = bob.session.poll_timeout();
    assert_eq!(retry, bob.now + RETRY_MS);
    // Still full at the retry: kept again.
    bob.now = retry;
    bob.call(&env, |s, ctx| s.handle_timeout(ctx));
    assert!(env.take_submitted().is_empty());
    env.full.set(false);
    bob.now = bob.session.poll_timeout();
    assert_eq!(
        bob.call(&env, |s, ctx| s.handle_timeout(ctx)),
        Flow::Continue
    );
    assert_eq!(one_ack(&env.take_submitted()), Some(vec![(seq, 0)]));
    // Back to the keepalive deadline.
    assert!(bob.session.poll_timeout() > bob.now + RETRY_MS);
}

#[test]
fn read_goes_to_the_commit_thread() {
    let env = FakeEnv::new();
    let mut bob = Conn::login(&env, "bob", 1);
    let read = wire::Read {
        from: Some("carol"),
        id: Some(1),
        group: None,
    };
    assert_eq!(bob.frame(&env, Frame::Read(read)), Flow::Continue);
    let reqs = env.take_submitted();
    assert!(
        matches!(&reqs[..], [Request::Read { from, id: 1, group: None, .. }] if from == "carol")
    );
    assert_eq!(bob.written(), []);
}

#[test]
fn reads_queued_at_the_commit_thread_are_bounded_per_user() {
    let env = FakeEnv::new();
    let mut bob = Conn::login(&env, "bob", 1);
    let read = |from, id| {
        Frame::Read(wire::Read {
            from: Some(from),
            id: Some(id),
            group: None,
        })
    };
    for id in 0..crate::commit::MAX_QUEUED_READS as u64 + 100 {
        bob.frame(&env, read("carol", id));
    }
    // The commit thread has not taken any: the rest were dropped.
    let queued = env.take_submitted();
    assert_eq!(queued.len(), crate::commit::MAX_QUEUED_READS);
    bob.frame(&env, read("carol", 1));
    assert!(env.take_submitted().is_empty());
    // Once done, they give their places back.
    drop(queued);
    bob.frame(&env, read("carol", 1));
    assert_eq!(env.take_submitted().len(), 1);
    // A READ naming no possible sender or group is ignored.
    let long = "c".repeat(256);
    bob.frame(&env, read(&long, 1));
    bob.frame(
        &env,
        Frame::Read(wire::Read {
            from: Some("carol"),
            id: Some(1),
            group: Some("no spaces"),
        }),
    );
    assert!(env.take_submitted().is_empty());
    assert_eq!(bob.written(), []);
}

#[test]
fn items_written_before_are_redelivered_with_the_flag() {
    let env = FakeEnv::new();
    let item = env.store("bob", 0, 1);
    // An item stored in an earlier boot.
    let old_seq = ((BOOT - 1) << SEQ_BOOT_SHIFT) | 5;
    let old = Arc::new(Item {
        seq: old_seq,
        priority: 1,
        ephemeral: false,
        record: msg_record("carol", 9, T0 + 3_600_000),
        born_us: 0,
        pushed_us: Default::default(),
        group_ref: None,
        settle_hint: Default::default(),
    });
    env.inbox
        .borrow_mut()
        .insert(("bob".into(), 1, old_seq), old);
    let mut first = Conn::login(&env, "bob", 1);
    assert_eq!(first.msgs(), [(item.seq, 1, false), (old_seq, 9, true)]);
    // The connection drops before ACKing; the next login gets the item again.
    first.session.on_close();
    let mut second = Conn::login(&env, "bob", 2);
    assert_eq!(second.msgs(), [(item.seq, 1, true), (old_seq, 9, true)]);
}

#[test]
fn expired_items_are_not_delivered() {
    let env = FakeEnv::new();
    let item = Arc::new(Item {
        seq: env.dir.user("bob").unwrap().next_seq(),
        priority: 0,
        ephemeral: false,
        record: msg_record("carol", 1, T0),
        born_us: 0,
        pushed_us: Default::default(),
        group_ref: None,
        settle_hint: Default::default(),
    });
    env.inbox
        .borrow_mut()
        .insert(("bob".into(), 0, item.seq), item);
    let mut bob = Conn::login(&env, "bob", 1);
    assert_eq!(bob.msgs(), []);
}

#[test]
fn output_stops_at_conn_buffer_and_resumes_when_pumped() {
    let mut env = FakeEnv::new();
    env.config.conn_buffer = 64;
    for id in 1..=5 {
        env.store("bob", 0, id);
    }
    let mut bob = Conn::login(&env, "bob", 1);
    let mut got = bob.msgs();
    assert!(got.len() < 5, "stopped at conn_buffer");
    // The event loop flushed the buffer: pumping again continues.
    while got.len() < 5 {
        let before = got.len();
        bob.call(&env, |s, ctx| s.pump(ctx));
        got.extend(bob.msgs());
        assert!(got.len() > before, "a pump with room writes more");
    }
    let ids: Vec<u64> = got.iter().map(|m| m.1).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
}

#[test]
fn frames_kinds_are_all_covered() {
    // Every client-to-server kind is handled above (HELLO, SEND, ACK, READ,
    // PING, BYE) and every server-to-client kind is refused: this list
    // fails when a kind is added without a test.
    let handled = [
        Kind::HELLO,
        Kind::SEND,
        Kind::ACK,
        Kind::READ,
        Kind::PING,
        Kind::BYE,
        Kind::WELCOME,
        Kind::MSG,
        Kind::STATUS,
        Kind::PONG,
        Kind::ERROR,
    ];
    let mut all: Vec<u8> = Kind::ALL.iter().map(|k| k.0).collect();
    let mut covered: Vec<u8> = handled.iter().map(|k| k.0).collect();
    all.sort_unstable();
    covered.sort_unstable();
    assert_eq!(all, covered);
}
